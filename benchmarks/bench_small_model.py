"""A small model's token time against its bound: greedy decode steps, and `jmoss generate` with
its default sampling, 1 and 2 threads, in one process per store.

The case of issue #28: a 4-layer CodeGen store decoding at ~100 ms per token while the 350M shape
decoded at ~15. Profiled (cProfile, perf): with a MOSS-sized vocabulary the per-token time of
``generate`` was mostly the sampler, not the model: top-p sorted the whole vocabulary (a
107,008-entry argsort) and ran three more full passes over it every token, which costs as much as
or more than a small model's forward. The bound printed is the weight bytes one token reads over
the memory read probe measured in the same process.

    python benchmarks/bench_small_model.py STORE [STORE ...] [--tokens 24] [--out FILE]

Stores: benchmarks/random_store.py with ``--set n_layer=4`` and ``--tokenizer`` (generate needs
one), e.g. the CodeGen-350M layer shape with MOSS's 107,008-token vocabulary and tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_threads import commit, cpu_name, load_average, run_child  # noqa: E402


def measure(store: str, tokens: int) -> dict:
    import jmoss
    from jmoss import kernels
    from jmoss.bench import resident_weight_bytes
    from jmoss.generation import generate_tokens

    model = jmoss.load(store, device="cpu")
    if hasattr(model.weights, "wait_for_copy"):  # weights being copied into 2 MiB pages: measure the copy
        model.weights.wait_for_copy()
    weight_bytes = resident_weight_bytes(model)
    out: dict = {"store": store, "weight_bytes": weight_bytes, "vocab": model.config.vocab_size,
                 "layers": model.config.n_layer}
    sampling = dict(do_sample=True, temperature=0.7, top_p=0.8, repetition_penalty=1.02, seed=0)  # the CLI's
    prompt = [int(t) for t in np.random.default_rng(0).integers(100, 1000, 8)]
    for threads in (1, 2):
        with kernels.configured(threads=threads):
            probe = kernels.memory_read_probe(1 << 30, repeats=3, threads=threads)
            session = model.session(max_len=16 + 2 * tokens)
            token = int(np.argmax(session.prefill([prompt])[0]))
            for _ in range(2):
                token = int(np.argmax(session.decode([token])[0]))
            start = time.perf_counter()
            for _ in range(tokens):
                token = int(np.argmax(session.decode([token])[0]))
            greedy = (time.perf_counter() - start) / tokens
            generate_tokens(model, prompt, max_new_tokens=2, **sampling)  # warm
            start = time.perf_counter()
            n = len(generate_tokens(model, prompt, max_new_tokens=tokens, **sampling))
            sampled = (time.perf_counter() - start) / max(n, 1)
        out[f"{threads}T"] = {"probe_gbps": probe, "greedy_ms": greedy * 1e3, "generate_ms": sampled * 1e3,
                              "bound_ms": weight_bytes / probe / 1e6, "generate_tokens": n}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stores", nargs="+")
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--label", default="", help="what tree this is (before/after), printed with the rows")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT" + json.dumps(measure(args.stores[0], args.tokens)), flush=True)
        return 0
    lines = [f"# ==== {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit()} {args.label}",
             f"# CPU: {cpu_name()}; {args.tokens} tokens per figure; generate = the CLI's sampling defaults"]
    for store in args.stores:
        before = load_average()
        result, proc = run_child([sys.executable, __file__, store, "--child", "--tokens", str(args.tokens)])
        if result is None:
            lines += [f"## {store}: failed (exit {proc.returncode})", *proc.stderr.strip().splitlines()[-10:]]
            continue
        lines.append(f"## {Path(store).name}: {result['layers']} layers, vocab {result['vocab']}, "
                     f"{result['weight_bytes'] / 1e6:.0f} MB read per token {args.label}")
        for t in ("1T", "2T"):
            r = result[t]
            lines.append(f"{t}: bound {r['bound_ms']:.1f} ms (probe {r['probe_gbps']:.2f} GB/s); greedy decode "
                         f"{r['greedy_ms']:.1f} ms/token ({r['bound_ms'] / r['greedy_ms']:.0%} of bound); generate "
                         f"(sampling) {r['generate_ms']:.1f} ms/token ({r['bound_ms'] / r['generate_ms']:.0%} of bound)")
        lines.append(f"# {before} before, {load_average()} after")
    print("\n".join(lines), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
