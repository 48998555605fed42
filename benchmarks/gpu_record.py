"""One command for a fresh device machine: the MOSS-16B offloading record (text + JSON).

Steps: probe pinned host->device bandwidth (CUDA events through jmoss.cuda_runtime); write a
MOSS-16B-shaped random fp16 store to local disk (benchmarks/random_store.py: numpy bulk RNG);
run greedy decoding unconstrained and at each ``--budgets`` device budget, ``--tokens`` tokens
each; report device memory in use after load (cudaMemGetInfo) and, from the engine, the resident
bytes copied to device Vars at load against what cudaMemGetInfo saw the load add; tok/s, streamed bytes/token,
achieved GB/s against the probe and whether the greedy tokens agree across budgets; then Jittor's
own swap at ``--swap-budget`` in a subprocess under ``--swap-seconds``.

``--dry-run`` runs the same code on the CPU with a tiny shape (budgets scaled to the tiny model,
host RSS instead of cudaMemGetInfo, a memcpy probe instead of the pinned copy); the test suite
runs it. The runbook is benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# Jittor's import tries `import cupy` (its numpy_code bridge, which jmoss never uses). On the device
# the stock cupy is built for numpy 2 while this process runs on the carried numpy 1.26.4: keep
# it from being half-imported (and from opening a CUDA context of its own) in the record.
sys.modules.setdefault("cupy", None)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from random_store import write_random_store  # noqa: E402

from jmoss.config import MossConfig  # noqa: E402
from jmoss.sizes import parse_size  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MOSS_CONFIG = REPO.parent / "shared" / "assets" / "moss-moon-003-sft" / "config.json"
TINY = dict(vocab_size=1024, n_positions=128, n_embd=256, n_layer=4, n_head=4, rotary_dim=16)
PROMPT = [11, 22, 33, 44, 55, 66, 77, 88]


def probe(device: str) -> dict:
    if device == "cuda":
        from jmoss import cuda_runtime

        return cuda_runtime.pinned_h2d_gbps()
    a, b = np.ones(64 << 20, np.uint8), np.empty(64 << 20, np.uint8)
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        np.copyto(b, a)
        best = max(best, a.nbytes / (time.perf_counter() - t) / 1e9)
    return {"what": "host memcpy (dry run: no device)", "gbps": best, "bytes": a.nbytes}


def memory_in_use(device: str) -> int:
    """Device bytes in use now (cudaMemGetInfo), or this process's RSS on the CPU."""
    if device == "cuda":
        from jmoss import cuda_runtime

        free, total = cuda_runtime.mem_info()
        return total - free
    import psutil

    return psutil.Process().memory_info().rss


def run_budget(store: Path, device: str, budget: int | None, tokens: int) -> dict:
    import jmoss

    base = memory_in_use(device)
    t0 = time.perf_counter()
    try:
        model = jmoss.load(store, device=device, dtype="float16", device_memory=budget, max_seq_len=len(PROMPT) + tokens + 1)
    except jmoss.JmossError as exc:
        return {"budget": budget, "error": str(exc).splitlines()[0]}
    load_s = time.perf_counter() - t0
    after_load = memory_in_use(device)
    # what the CUDA engine copied to device Vars at load, and what cudaMemGetInfo saw the load add
    engine_memory = getattr(model.weights, "load_memory", None)
    stats = getattr(model.weights, "stats", None)
    session = model.session(max_len=len(PROMPT) + tokens + 1)
    logits = session.prefill([PROMPT])
    out = [int(np.argmax(logits[0, -1]))]
    read0 = stats.bytes_read if stats else 0
    t1 = time.perf_counter()
    for _ in range(tokens - 1):
        logits = session.decode([out[-1]])
        out.append(int(np.argmax(logits[0, -1])))
    decode_s = time.perf_counter() - t1
    steps = max(1, tokens - 1)
    per_token = ((stats.bytes_read - read0) / steps) if stats else 0
    close = getattr(model.weights, "close", None)
    if close:
        close()
    return {
        "budget": budget, "load_seconds": round(load_s, 2), "memory_in_use_after_load": after_load,
        "memory_added_by_load": after_load - base, "tok_per_s": steps / decode_s if decode_s > 0 else None,
        "bytes_per_token": per_token, "achieved_gbps": per_token * steps / decode_s / 1e9 if decode_s > 0 else None,
        "tokens": out, "engine_load_memory": engine_memory,
        # resident weights in device memory from load on, measured by the allocator, not assumed
        "resident_on_device_at_load": (engine_memory["device_bytes_added_by_load"] >= engine_memory["resident_bytes_copied"]
                                       if engine_memory else None),
    }


def jittor_swap(store: Path, budget: int, tokens: int, seconds: int) -> dict:
    """Jittor's native swap baseline in its own process (its own core build), killed at ``seconds``."""
    code = ("import json,sys; sys.path.insert(0, %r); import gpu_record as g; "
            "print('RESULT ' + json.dumps(g.run_swap(%r, %d, %d)))") % (str(Path(__file__).parent), str(store), budget, tokens)
    env = dict(os.environ, JMOSS_JITTOR_SAVE_MEM="1")
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=seconds)
    except subprocess.TimeoutExpired:
        return {"budget": budget, "error": f"did not finish within {seconds} s (time cap)"}
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
    return json.loads(line[7:]) if line else {"budget": budget, "error": (done.stderr or done.stdout)[-500:]}


def run_swap(store: str, budget: int, tokens: int) -> dict:
    import jmoss

    model = jmoss.load(store, device="cpu", dtype="float32", device_memory=budget, swap="jittor")
    session = model.session(max_len=len(PROMPT) + tokens + 1)
    logits = session.prefill([PROMPT])
    out = [int(np.argmax(logits[0, -1]))]
    t = time.perf_counter()
    for _ in range(tokens - 1):
        out.append(int(np.argmax(session.decode([out[-1]])[0, -1])))
    return {"budget": budget, "tok_per_s": (tokens - 1) / (time.perf_counter() - t), "tokens": out}


def record(args) -> dict:
    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        config = MossConfig(**TINY)
    else:
        config = MossConfig.from_json_file(args.config)
    store = args.store
    t = time.perf_counter()
    if not (store / "manifest.json").exists() and not any(store.glob("*.json")) or args.rewrite_store:
        write_random_store(store, config)
    store_s = time.perf_counter() - t
    from jmoss.store import Store

    total = sum(Store.open(store).group_nbytes(g) for g in Store.open(store).groups())
    if args.dry_run:  # the same budgets as fractions of MOSS-16B's 33.4 GB, scaled to the tiny model
        # plus the CPU plan's fixed 128 MiB reserve, KV, working buffers and two 1.5 MiB staging slots (131.5 MiB)
        budgets = [None] + [int(131.5 * 2**20) + int(total * f) for f in (20 / 31.1, 16 / 31.1, 12 / 31.1, 8 / 31.1)]
    else:
        budgets = [None if b in ("none", "") else parse_size(b) for b in args.budgets.split(",")]
    result = {"device": device, "config": config.to_dict(), "store_bytes": total, "store_write_seconds": round(store_s, 1),
              "probe": probe(device), "runs": []}
    for budget in budgets:
        result["runs"].append(run_budget(store, device, budget, args.tokens))
    token_lists = [r["tokens"] for r in result["runs"] if "tokens" in r]
    result["greedy_tokens_equal"] = bool(token_lists) and all(t == token_lists[0] for t in token_lists)
    for r in result["runs"]:
        if r.get("achieved_gbps") and result["probe"]["gbps"]:
            r["fraction_of_probe"] = r["achieved_gbps"] / result["probe"]["gbps"]
    if args.dry_run:
        result["jittor_swap"] = {"skipped": "dry run: Jittor's swap needs its own core build (minutes)"}
    else:
        result["jittor_swap"] = jittor_swap(store, parse_size(args.swap_budget), args.tokens, args.swap_seconds)
    return result


def as_text(result: dict) -> str:
    lines = [f"device {result['device']}; store {result['store_bytes'] / 2**30:.2f} GiB written in "
             f"{result['store_write_seconds']} s; probe {result['probe']['gbps']:.2f} GB/s ({result['probe']['what']})",
             f"{'budget':>12} {'mem after load':>15} {'tok/s':>8} {'MB/token':>9} {'GB/s':>7} {'of probe':>8}"]
    for r in result["runs"]:
        budget = "none" if r["budget"] is None else f"{r['budget'] / 2**30:.3f}GiB"
        if "error" in r:
            lines.append(f"{budget:>12} error: {r['error']}")
            continue
        lines.append(f"{budget:>12} {r['memory_in_use_after_load'] / 2**20:>13.1f}MB {r['tok_per_s'] or 0:>8.2f} "
                     f"{r['bytes_per_token'] / 1e6:>9.1f} {r['achieved_gbps'] or 0:>7.2f} {r.get('fraction_of_probe', 0):>8.2f}")
        if r.get("engine_load_memory"):
            m = r["engine_load_memory"]
            lines.append(f"{'':>12} resident {m['resident_bytes_copied'] / 2**20:.1f} MiB copied to device at load; "
                         f"cudaMemGetInfo: +{m['device_bytes_added_by_load'] / 2**20:.1f} MiB "
                         f"(on device at load: {r['resident_on_device_at_load']})")
    lines.append(f"greedy tokens equal across budgets: {result['greedy_tokens_equal']}")
    lines.append(f"jittor swap: {json.dumps(result['jittor_swap'])}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shape on the CPU (the test suite runs this)")
    parser.add_argument("--config", type=Path, default=MOSS_CONFIG)
    parser.add_argument("--store", type=Path, default=REPO / ".cache" / "gpu-record" / "store")
    parser.add_argument("--rewrite-store", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / ".cache" / "gpu-record")
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--budgets", default="none,20GiB,16GiB,12GiB,8GiB")
    parser.add_argument("--swap-budget", default="16GiB")
    parser.add_argument("--swap-seconds", type=int, default=90)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = record(args)
    text = as_text(result)
    (args.out / "gpu_record.json").write_text(json.dumps(result, indent=1))
    (args.out / "gpu_record.txt").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
