"""Write a random fp16 jmoss store of any MOSS shape, fast (numpy bulk RNG, one block at a time).

Used by the GPU record (a MOSS-16B-shaped store, 31 GiB) and the CUDA build check (2 layers).
Values are N(0, 0.02) fp16, drawn in float32 blocks of at most 64 Mi elements and written row
blocks at a time, so memory stays bounded and no per-element Python runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jmoss import layout
from jmoss.config import MossConfig
from jmoss.store import GroupWriter, finalize_store

BLOCK_ELEMENTS = 64 << 20


def write_random_store(out: Path, config: MossConfig, seed: int = 0, std: float = 0.02) -> Path:
    """A complete store at ``out`` with random weights (LayerNorm weights 1, biases 0)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = {}
    for group in layout.all_groups(config):
        writer = GroupWriter(out, config, group)
        try:
            for name, shape in writer.shapes.items():
                shape = tuple(shape)
                if name.endswith(".bias") or (name.startswith("ln") or ".ln" in name) and name.endswith("weight"):
                    fill = 1.0 if name.endswith("weight") else 0.0
                    writer.write_tensor(name, np.full(shape, fill, np.float16))
                    continue
                row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
                rows_per_block = max(1, BLOCK_ELEMENTS // max(row, 1))
                if len(shape) == 1:
                    writer.write_tensor(name, (rng.standard_normal(shape, np.float32) * std).astype(np.float16))
                    continue
                for start in range(0, shape[0], rows_per_block):
                    n = min(rows_per_block, shape[0] - start)
                    block = rng.standard_normal((n, *shape[1:]), np.float32)
                    block *= std
                    writer.write_rows(name, start, block.astype(np.float16))
            records[group] = writer.finish()
        except BaseException:
            writer.abort()
            raise
    return finalize_store(out, config, records, source={"id": "random", "seed": seed})
