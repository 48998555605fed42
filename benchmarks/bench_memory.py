"""Peak RSS of a budgeted long-prompt run and of a fully resident load, old tree vs new, from outside.

Two measurements (issue 15), each run a fresh child interpreter whose peak RSS (``VmHWM``) the
parent reads from /proc while the child is stopped at its end (``jmoss.bench.spawn_measured``):

- ``long``: a random fp16 store (default 24 layers x 1024 wide, MOSS's 107008-token vocabulary)
  at its minimum CPU budget for a ``--prompt``-token prompt (default 1900) + 4 decode tokens, and
  the same budget with a 64-token prompt + 16 decode tokens (the short-prompt figures). Bound:
  peak <= budget + baseline + 64 MiB, the baseline being the same script on a 1-layer model of
  the same shapes with no budget and a 16-token prompt.
- ``resident``: a fully resident load (no budget) of a >= 1.5 GB store, one 16-token prefill.
  In fp16 the weights are the store's mapped pages (page cache; jmoss.engine.resident), so the
  bound is on anonymous memory, what the process itself allocates: peak ``RssAnon`` (sampled every
  2 ms, ``jmoss.bench.spawn_measured_memory``) <= baseline's + 10% of the weights; peak RSS, which
  counts the mapped pages, stays <= 1.1 x weights + baseline. In fp32 (``--dtype float32``, owned
  widened copies) the old bound, peak RSS <= 1.1 x weights + baseline, is the one that applies.

Every child runs once per tree given with ``--tree NAME=PATH`` (a checkout whose ``jmoss`` goes
first on PYTHONPATH; e.g. ``git archive 81fe2fc | tar -x -C /tmp/old``), so old and new are
measured in the same session on the same stores.

    python benchmarks/bench_memory.py --stores /tmp/stores --tree old=/tmp/old --tree new=.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
opts = json.loads(sys.argv[1])
sys.path.insert(0, opts["tree"])  # before the cwd that ``python -c`` puts first
import numpy as np
import jmoss
t0 = time.perf_counter()
model = jmoss.load(opts["store"], device="cpu", device_memory=opts["budget"], max_seq_len=opts["max_len"],
                   dtype=opts.get("dtype"), **({"prefill_chunk": opts["chunk"]} if opts.get("chunk") else {}))
load_s = time.perf_counter() - t0
prompt = [int(t) for t in np.random.default_rng(0).integers(0, model.config.vocab_size, opts["prompt"])]
session = model.session(max_len=opts["max_len"])
t0 = time.perf_counter()
logits = session.prefill([prompt])
prefill_s = time.perf_counter() - t0
tokens = []
t0 = time.perf_counter()
for _ in range(opts["decode"]):
    tokens.append(int(np.argmax(logits[0])))
    logits = session.decode([tokens[-1]])
decode_s = time.perf_counter() - t0
plan = model.plan
print("RESULT " + json.dumps({
    "tokens": tokens, "load_s": load_s, "prefill_tok_s": opts["prompt"] / prefill_s,
    "decode_tok_s": opts["decode"] / decode_s if opts["decode"] else None,
    "engine": type(model.weights).__name__, "dtype": model.dtype, "budget": plan.budget_bytes if opts["budget"] else None,
    "resident_bytes": plan.resident_bytes, "prefill_chunk": getattr(session, "prefill_chunk", None),
    "jmoss": jmoss.__file__,
}))
from jmoss.bench import stop_for_measurement
stop_for_measurement()
"""

MiB = 1 << 20


def shapes(n_layer: int, width: int = 1024, n_positions: int = 2048) -> dict:
    return dict(n_embd=width, n_head=width // 64, rotary_dim=32, n_layer=n_layer, vocab_size=107008,
                n_positions=n_positions)


def make_store(root: Path, n_layer: int, width: int = 1024) -> Path:
    """A random fp16 store of ``shapes(n_layer, width)`` under ``root``, written once."""
    from jmoss.config import MossConfig
    from jmoss.store import MANIFEST

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from random_store import write_random_store

    path = root / f"random-{width}x{n_layer}"
    if not (path / MANIFEST).is_file():
        config = MossConfig.from_dict({**shapes(n_layer, width), "model_type": "moss", "eos_token_id": None})
        write_random_store(path, config)
    return path


def weight_bytes(store: Path) -> int:
    """Bytes a resident load holds: every layer and the head (the embedding stays an mmap)."""
    from jmoss import layout
    from jmoss.store import Store

    s = Store.open(store)
    return sum(s.group_data_span(g)[1] for g in layout.all_groups(s.config) if g != layout.EMBED)


def run(tree: Path, opts: dict) -> dict:
    from jmoss.bench import spawn_measured_memory

    env = {**os.environ, "PYTHONPATH": str(tree)}
    opts = {**opts, "tree": str(tree.resolve())}
    with tempfile.TemporaryFile("w+") as log:
        code, memory = spawn_measured_memory([sys.executable, "-c", CHILD, json.dumps(opts)], env=env, log=log)
        log.seek(0)
        out = log.read()
    if code != 0 or memory["peak_rss"] is None:
        raise SystemExit(f"child failed ({code}):\n{out[-3000:]}")
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    result.update(memory)
    if not result["jmoss"].startswith(opts["tree"]):
        raise SystemExit(f"the child imported {result['jmoss']}, not the tree {opts['tree']}")
    return result


def mib(n: float) -> str:
    return f"{n / MiB:8.1f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stores", type=Path, required=True)
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH of a jmoss checkout")
    parser.add_argument("--layers", type=int, default=24, help="layers of the long-prompt store")
    parser.add_argument("--resident-layers", type=int, default=52, help="layers of the resident store")
    parser.add_argument("--prompt", type=int, default=1900)
    parser.add_argument("--width", type=int, default=1024, help="n_embd of the long-prompt store (and its baseline)")
    parser.add_argument("--prefill-chunk", type=int, default=None, help="the plan's prefill chunk (default: jmoss's)")
    parser.add_argument("--what", default="long,resident")
    parser.add_argument("--dtype", default=None, help="weight dtype of the resident load (default: jmoss's)")
    args = parser.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree)
    what = args.what.split(",")
    args.stores.mkdir(parents=True, exist_ok=True)

    from jmoss.config import MossConfig
    from jmoss.placement import plan_placement
    from jmoss.store import Store

    print(f"# {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}; load average {os.getloadavg()}")
    print(f"# trees: {trees}")
    baseline_store = make_store(args.stores, 1, args.width if "long" in what else 1024)
    if "long" in what:
        store = make_store(args.stores, args.layers, args.width)
        max_len = args.prompt + 4
        config = Store.open(store).config
        chunk = {"prefill_chunk": args.prefill_chunk} if args.prefill_chunk else {}
        plan = plan_placement(config, device="cpu", device_memory=None, host_memory=None, max_seq_len=max_len,
                              weight_itemsize=2, **chunk)
        budget = plan.minimum_device_bytes
        total = sum(f.stat().st_size for f in store.glob("*.safetensors"))
        print(f"\n## long prompt: store {store.name}, {total / 1e6:.0f} MB of files "
              f"({weight_bytes(store) / 1e6:.0f} MB layers + head), minimum budget {mib(budget).strip()} "
              f"for max_seq_len {max_len} = {total / budget:.2f}x the budget")
        for name, tree in trees.items():
            base = run(Path(tree), dict(store=str(baseline_store), budget=None, max_len=max_len, prompt=16, decode=8,
                                        chunk=args.prefill_chunk))
            for label, n_prompt, n_new in (("long", args.prompt, 4), ("short", 64, 16)):
                r = run(Path(tree), dict(store=str(store), budget=budget, max_len=max_len, prompt=n_prompt,
                                         decode=n_new, chunk=args.prefill_chunk))
                bound = budget + base["peak_rss"] + 64 * MiB
                print(f"{name:>4} {label:<5} prompt {n_prompt:>4} + {n_new:>2} decode: peak RSS {mib(r['peak_rss'])} "
                      f"(bound budget {mib(budget).strip()} + baseline {mib(base['peak_rss']).strip()} + 64 MiB = "
                      f"{mib(bound).strip()}: {'within' if r['peak_rss'] <= bound else 'OVER'}); "
                      f"prefill {r['prefill_tok_s']:.1f} tok/s, decode {r['decode_tok_s']:.3f} tok/s, "
                      f"chunk {r['prefill_chunk']}, engine {r['engine']}, tokens {r['tokens']}")
    if "resident" in what:
        store = make_store(args.stores, args.resident_layers)
        weights = weight_bytes(store) * (2 if args.dtype == "float32" else 1)  # fp32 widens the fp16 store
        total = sum(f.stat().st_size for f in store.glob("*.safetensors"))
        print(f"\n## resident load: store {store.name}, {total / 1e9:.2f} GB of files, "
              f"{weights / 1e9:.2f} GB of layers + head held ({mib(weights).strip()}, dtype {args.dtype or 'default'})")
        for name, tree in trees.items():
            opts = dict(budget=None, max_len=128, prompt=16, decode=2, dtype=args.dtype)
            base = run(Path(tree), dict(store=str(baseline_store), **opts))
            r = run(Path(tree), dict(store=str(store), **opts))
            bound = 1.1 * weights + base["peak_rss"]
            print(f"{name:>4} resident: peak RSS {mib(r['peak_rss'])} = {r['peak_rss'] / weights:.2f}x the weights; "
                  f"minus baseline {mib(base['peak_rss']).strip()}: {(r['peak_rss'] - base['peak_rss']) / weights:.2f}x "
                  f"(bound 1.1x weights + baseline = {mib(bound).strip()}: "
                  f"{'within' if r['peak_rss'] <= bound else 'OVER'}); load {r['load_s']:.1f} s, engine {r['engine']} {r['dtype']}")
            anon = r["peak_anon"] - base["peak_anon"]
            print(f"{name:>4} resident: peak anonymous memory {mib(r['peak_anon'])}, baseline {mib(base['peak_anon']).strip()}: "
                  f"+{anon / weights:.1%} of the weights (bound for mapped fp16 weights: 10%: "
                  f"{'within' if anon <= 0.1 * weights else 'OVER'}); mapped store pages at the end "
                  f"{mib(r['file_at_end'] or 0).strip()}")
    print(f"# load average after {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
