"""Write a random jmoss store of any MOSS shape, fast (numpy bulk RNG, one block at a time).

fp16 stores (``config.wbits`` 32) are used by the GPU record (a MOSS-16B-shaped store, 31 GiB) and
the CUDA build check (2 layers). Values are N(0, 0.02) fp16, drawn in float32 blocks of at most
64 Mi elements and written row blocks at a time, so memory stays bounded and no per-element Python
runs.

Packed stores (``config.wbits`` 4 or 8, store format 2) are what the CPU decode benchmarks read at
MOSS-16B scale (benchmarks/bench_threads.py): every packed matrix gets uniformly random codes
(random bytes: for int4 two random nibbles), ``perm`` the identity (no act-order, as the released
GPTQ MOSS int4), zeros at the middle code and scales near ``std / code std`` with a little jitter,
so the weights have roughly the fp16 mode's spread and activations stay finite. lm_head is packed at
``wbits`` and wte at int8, as `jmoss convert --quantize` writes them.

    python benchmarks/random_store.py OUT --config CONFIG_JSON [--wbits 4|8] [--seed 0] [--set n_layer=4]
        [--tokenizer DIR]

writes ``OUT.partial`` and renames it to ``OUT`` only when the store is complete.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from jmoss import layout
from jmoss.config import MossConfig
from jmoss.store import GroupWriter, finalize_store

BLOCK_ELEMENTS = 64 << 20


def _is_norm_or_bias(name: str) -> bool:
    return name.endswith(".bias") or ((name.startswith("ln") or ".ln" in name) and name.endswith("weight"))


def _write_fp16(writer: GroupWriter, name: str, shape: tuple[int, ...], rng: np.random.Generator, std: float) -> None:
    if _is_norm_or_bias(name):
        writer.write_tensor(name, np.full(shape, 1.0 if name.endswith("weight") else 0.0, np.float16))
        return
    if len(shape) == 1:
        writer.write_tensor(name, (rng.standard_normal(shape, np.float32) * std).astype(np.float16))
        return
    row = int(np.prod(shape[1:]))
    rows_per_block = max(1, BLOCK_ELEMENTS // max(row, 1))
    for start in range(0, shape[0], rows_per_block):
        n = min(rows_per_block, shape[0] - start)
        block = rng.standard_normal((n, *shape[1:]), np.float32)
        block *= std
        writer.write_rows(name, start, block.astype(np.float16))


def _write_packed_part(writer: GroupWriter, name: str, shape: tuple[int, ...], bits: int, k_in: int,
                       rng: np.random.Generator, std: float) -> None:
    """One of a packed Linear's four tensors (``perm``, ``qweight``, ``scales``, ``zeros``)."""
    part = name.rsplit(".", 1)[1]
    if part == "perm":
        writer.write_tensor(name, np.arange(shape[0], dtype=np.int32))
        return
    levels = 1 << bits
    row_bytes = int(shape[1])
    rows_per_block = max(1, BLOCK_ELEMENTS // row_bytes)
    used = (k_in * bits + 7) // 8  # bytes that hold codes; the rest of a row is padding (zero)
    code_std = levels / np.sqrt(12.0)  # a uniform code's standard deviation
    for start in range(0, shape[0], rows_per_block):
        n = min(rows_per_block, shape[0] - start)
        if part == "qweight":
            block = rng.integers(0, 256, (n, row_bytes), dtype=np.uint8)
            block[:, used:] = 0
            if bits == 4 and k_in % 2:
                block[:, used - 1] &= 0x0F
        elif part == "scales":
            block = (rng.uniform(0.8, 1.2, (n, row_bytes)).astype(np.float32) * (std / code_std)).astype(np.float16)
        else:  # zeros: the middle of the code range
            block = np.full((n, row_bytes), (levels - 1) / 2, np.float16)
        writer.write_rows(name, start, block)


def write_random_store(out: Path, config: MossConfig, seed: int = 0, std: float = 0.02,
                       tokenizer_dir: Path | None = None) -> Path:
    """A complete store at ``out`` with random weights (LayerNorm weights 1, biases 0); packed
    (format 2) when ``config.wbits`` is 4 or 8, else fp16; with the tokenizer files of
    ``tokenizer_dir`` when given (text in, text out)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if layout.packed_bits(config):
        config = layout.resolved(config)
    records = {}
    for group in layout.all_groups(config):
        writer = GroupWriter(out, config, group)
        bits = layout.group_bits(config, group)
        try:
            packed_k = {}  # prefix -> K of each packed Linear of this group (from its perm)
            for name, (shape, _) in writer.tensors.items():
                if name.endswith(".perm"):
                    packed_k[name[: -len(".perm")]] = int(shape[0])
            for name, (shape, _) in writer.tensors.items():
                shape = tuple(shape)
                prefix = name.rsplit(".", 1)[0]
                if prefix in packed_k and name.rsplit(".", 1)[1] in ("perm", "qweight", "scales", "zeros"):
                    _write_packed_part(writer, name, shape, bits or 8, packed_k[prefix], rng, std)
                else:
                    _write_fp16(writer, name, shape, rng, std)
            records[group] = writer.finish()
        except BaseException:
            writer.abort()
            raise
    source = {"id": "random", "seed": seed}
    if layout.packed_bits(config):
        source["quantization"] = {"method": "random", "bits": [config.wbits], "group_size": config.groupsize}
    return finalize_store(out, config, records, source=source, tokenizer_dir=tokenizer_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--config", type=Path, required=True, help="an HF or store config.json (its shape)")
    parser.add_argument("--wbits", type=int, choices=(4, 8, 32), default=None,
                        help="packed int4/int8 layers, or 32 for fp16 (default: the config's)")
    parser.add_argument("--groupsize", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", type=Path, default=None, help="a folder whose tokenizer files the store gets")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=INT",
                        help="override a config field, e.g. --set n_layer=4 (repeatable)")
    args = parser.parse_args(argv)
    config = MossConfig.from_json_file(args.config)
    overrides = {field: int(value) for field, _, value in (item.partition("=") for item in args.set)}
    config = replace(config, **overrides)  # all at once: the fields are checked together
    if args.wbits is not None:
        config = replace(config, wbits=args.wbits, head_wbits=None, embed_wbits=None)
    if args.groupsize is not None:
        config = replace(config, groupsize=args.groupsize)
    out = args.out
    if out.exists():
        print(f"{out} exists; remove it first", file=sys.stderr)
        return 1
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    write_random_store(partial, config, seed=args.seed, tokenizer_dir=args.tokenizer)
    os.replace(partial, out)
    print(f"wrote {out}: {layout.describe_store(layout.resolved(config))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
