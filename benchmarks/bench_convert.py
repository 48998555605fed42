"""Conversion throughput against the plain sequential read speed of the same files.

    python benchmarks/bench_convert.py                      # synthetic MOSS-shaped fp16 shards
    python benchmarks/bench_convert.py --source DIR         # a real checkpoint folder
    python benchmarks/bench_convert.py --format safetensors --layers 8 --embd 1024

Conversion reads every source byte, casts/re-lays out, writes, fsyncs, and reads back each
group file to check and hash it, so its natural bound is the sequential read speed of the source
(both are measured here on the same files, same page-cache state: warm, since the first pass
warms it; dropping caches needs root). Numbers are MB/s of source bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path



def synthetic_checkpoint(out: Path, layers: int, embd: int, vocab: int, fmt: str) -> Path:
    """A MOSS-shaped checkpoint of random fp16 weights (2 shards + index, causal masks in .bin)."""
    import torch

    from jmoss.config import MossConfig
    from jmoss import layout

    config = dict(model_type="moss", vocab_size=vocab, n_positions=256, n_embd=embd, n_layer=layers,
                  n_head=max(4, embd // 128), rotary_dim=64, n_inner=None, activation_function="gelu_new")
    (out / "config.json").write_text(json.dumps(config))
    mc = MossConfig.from_dict(config)
    names = {"wte.weight": "transformer.wte.weight", "ln_f.weight": "transformer.ln_f.weight", "ln_f.bias": "transformer.ln_f.bias"}
    gen = torch.Generator().manual_seed(0)
    groups = layout.all_groups(mc)
    shards = [groups[: len(groups) // 2], groups[len(groups) // 2 :]]
    weight_map = {}
    for k, part in enumerate(shards):
        sd = {}
        for group in part:
            for name, shape in layout.group_shapes(mc, group).items():
                hf = names.get(name, name)
                if isinstance(group, int):
                    hf = f"transformer.h.{group}." + name.replace("attn.qkv.", "attn.qkv_proj.")
                sd[hf] = torch.randn(shape, generator=gen).half()
                if isinstance(group, int) and name == "attn.qkv.weight" and fmt == "pytorch":
                    sd[f"transformer.h.{group}.attn.causal_mask"] = torch.tril(torch.ones(256, 256, dtype=torch.uint8)).view(1, 1, 256, 256)
        if fmt == "pytorch":
            fname = f"pytorch_model-{k + 1:05d}-of-00002.bin"
            torch.save(sd, out / fname)
        else:
            from safetensors.torch import save_file

            fname = f"model-{k + 1:05d}-of-00002.safetensors"
            save_file(sd, out / fname)
        weight_map.update({n: fname for n in sd})
        del sd
    index = "pytorch_model.bin.index.json" if fmt == "pytorch" else "model.safetensors.index.json"
    (out / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def sequential_read(files: list[Path], block: int = 16 << 20) -> float:
    """Seconds to read ``files`` front to back in 16 MiB blocks into one reused buffer."""
    buf = bytearray(block)
    start = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, help="checkpoint folder (default: a synthetic one)")
    parser.add_argument("--format", choices=["pytorch", "safetensors"], default="pytorch")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--embd", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    from jmoss.converters.convert import convert
    from jmoss.converters.sources import resolve

    work = Path(tempfile.mkdtemp(prefix="jmoss-bench-"))
    try:
        if args.source is None:
            src = work / "src"
            src.mkdir()
            synthetic_checkpoint(src, args.layers, args.embd, args.vocab, args.format)
        else:
            src = args.source
        files = resolve(str(src)).weight_files
        total = sum(p.stat().st_size for p in files)
        sequential_read(files)  # warm the page cache so both measurements start from the same state
        reads, converts = [], []
        for i in range(args.repeat):
            reads.append(sequential_read(files))
            out = work / f"out{i}"
            t = time.perf_counter()
            convert(str(src), out, progress=False)
            converts.append(time.perf_counter() - t)
            store_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
            shutil.rmtree(out)
        mb = 1e6
        read_s, conv_s = min(reads), min(converts)
        print(f"source: {src} ({len(files)} files, {total / mb:.0f} MB); store {store_bytes / mb:.0f} MB; "
              f"{os.cpu_count()} CPUs; best of {args.repeat}")
        print(f"  sequential read (warm cache) : {total / mb / read_s:8.0f} MB/s  ({read_s:.2f} s)")
        print(f"  jmoss convert                : {total / mb / conv_s:8.0f} MB/s  ({conv_s:.2f} s)  "
              f"= {read_s / conv_s:.0%} of read speed")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
