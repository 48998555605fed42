"""One command for a fresh device machine: the MOSS-16B offloading record (text + JSON).

Steps: probe pinned host->device bandwidth (CUDA events through jmoss.cuda_runtime); write a
MOSS-16B-shaped random fp16 store to local disk (benchmarks/random_store.py: numpy bulk RNG);
run greedy decoding unconstrained and at each ``--budgets`` device budget in each ``--modes``
offload mode (stream: the layers the card cannot hold are copied every token; cpu: the CPU
computes them), ``--tokens`` tokens each; report device memory in use after load (cudaMemGetInfo)
and, from the engine, the resident bytes copied to device Vars at load against what cudaMemGetInfo
saw the load add; tok/s, streamed bytes/token, achieved GB/s against the probe, the plan's
predicted tok/s, the CPU segment's ms per token and GB/s and the hand-off bytes (offload cpu);
per budget, what offload auto chooses (the plan made with the figures jmoss.load measures: pinned
copy, CPU kernels, device bandwidth), why, and whether that was the faster of the two measured
runs (auto is always one of them, so it is planned, not run a third time); whether the greedy
tokens agree (streaming computes every layer in fp16 on the device; with offload cpu the CPU's
layers run in fp32, so on random weights those tokens may part: shown, not required); then
Jittor's own swap at ``--swap-budget`` in a subprocess under ``--swap-seconds``.

``--dry-run`` runs the same code on the CPU with a tiny shape (budgets scaled to the tiny model,
host RSS instead of cudaMemGetInfo, a memcpy probe instead of the pinned copy; offload cpu/auto
plan for cuda and run with a CPU backend standing in for the device); the test suite runs it. The
runbook is benchmarks/README.md.
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


def load_model(store: Path, device: str, budget: int | None, tokens: int, offload: str):
    """jmoss.load as a user would; in a dry run, offload cpu/auto plan for cuda and run the split
    with a CPU backend standing in for the device (the hybrid code path, on this machine)."""
    import jmoss

    max_seq_len = len(PROMPT) + tokens + 1
    if device == "cuda" or offload == "stream" or budget is None:
        return jmoss.load(store, device=device, dtype="float16", device_memory=budget, max_seq_len=max_seq_len,
                          offload=offload)
    from jmoss import layout
    from jmoss.api import Model
    from jmoss.engine import CpuBackend, build_hybrid
    from jmoss.jittor_setup import get_jittor
    from jmoss.placement import RUNTIME_RESERVE, plan_placement
    from jmoss.store import Store

    opened = Store.open(store)
    # the same weight room as the CPU plan at this budget: cuda's runtime reserve is larger
    cuda_budget = budget + RUNTIME_RESERVE["cuda"] - RUNTIME_RESERVE["cpu"]
    plan = plan_placement(opened.config, device="cuda", device_memory=cuda_budget, host_memory=None,
                          max_seq_len=max_seq_len, kv_dtype="float32", offload=offload, figures=dry_figures(opened.config))
    if not plan.hybrid:
        model = jmoss.load(store, device="cpu", dtype="float16", device_memory=budget, max_seq_len=max_seq_len)
        model.plan = plan  # what the cuda planner chose, for the record
        return model
    jt = get_jittor("cpu")
    stand_in = CpuBackend(jt, opened.config, name="device")
    weights, net = build_hybrid(opened, plan, jt, "float16", device=stand_in)
    return Model(opened.config, {layout.EMBED: opened.group(layout.EMBED)}, device="cpu", dtype="float16",
                 compute_dtype="float32", weights=weights, plan=plan, net=net, path=opened.path)


_dry_figures = None


def dry_figures(config):
    """Dry run: the CPU kernels' probe as the CPU, a memcpy as the link and as the device."""
    global _dry_figures
    if _dry_figures is None:
        from jmoss.engine.cpu import kernel_rates
        from jmoss.jittor_setup import get_jittor
        from jmoss.placement import Figures

        cpu = kernel_rates(get_jittor("cpu"), config, nbytes=32 << 20, repeats=2, gemm_rows=32)
        copy = probe("cpu")["gbps"]
        _dry_figures = Figures(link_gbps=copy, cpu_gbps=cpu["gbps"], cpu_gflops=cpu["gflops"], device_gbps=copy,
                               source="dry run: CPU kernels' probe, a memcpy for the link and the device")
    return _dry_figures


def auto_choice(store: Path, device: str, budget: int, tokens: int, runs: list[dict]) -> dict:
    """What offload auto picks at ``budget`` (the plan jmoss.load makes, with the figures it
    measures), why, and whether it is the faster of the modes measured in ``runs``."""
    import psutil

    from jmoss.engine import measure_figures
    from jmoss.jittor_setup import get_jittor
    from jmoss.placement import RUNTIME_RESERVE, plan_placement
    from jmoss.store import Store

    config = Store.open(store).config
    if device == "cuda":
        figures, kv_dtype = measure_figures(get_jittor("cuda"), config), "float16"
    else:  # the dry run's stand-in device, as load_model plans it
        figures, kv_dtype = dry_figures(config), "float32"
        budget = budget + RUNTIME_RESERVE["cuda"] - RUNTIME_RESERVE["cpu"]
    plan = plan_placement(config, device="cuda", device_memory=budget, host_memory=None,
                          available_host_bytes=int(psutil.virtual_memory().available), max_seq_len=len(PROMPT) + tokens + 1,
                          kv_dtype=kv_dtype, offload="auto", figures=figures)
    measured = {r["offload"]: r["tok_per_s"] for r in runs if r.get("tok_per_s") and r.get("offload") in ("stream", "cpu")}
    choice = plan.offload if plan.streams else "none"
    faster = max(measured, key=measured.get) if len(measured) == 2 else None
    return {"budget": runs[0]["budget"], "offload": choice, "reason": plan.reason, "predicted_tok_s": dict(plan.predicted_tok_s),
            "measured_tok_s": measured, "picked_the_faster": None if faster is None else choice == faster,
            "figures": None if plan.figures is None else plan.figures.to_dict()}


def run_budget(store: Path, device: str, budget: int | None, tokens: int, offload: str = "auto") -> dict:
    import jmoss

    base = memory_in_use(device)
    t0 = time.perf_counter()
    try:
        model = load_model(store, device, budget, tokens, offload)
    except jmoss.JmossError as exc:
        return {"budget": budget, "offload_requested": offload, "error": str(exc).splitlines()[0]}
    load_s = time.perf_counter() - t0
    after_load = memory_in_use(device)
    # what the CUDA engine copied to device Vars at load, and what cudaMemGetInfo saw the load add
    engine_memory = getattr(model.weights, "load_memory", None)
    stats = getattr(model.weights, "stats", None)
    handoff = getattr(model.net, "stats", None)  # the segmented engine's (offload cpu)
    session = model.session(max_len=len(PROMPT) + tokens + 1)
    logits = session.prefill([PROMPT])
    out = [int(np.argmax(logits[0, -1]))]
    read0 = stats.bytes_read if stats else 0
    if handoff is not None:
        handoff.reset()
        model.net.timed = True
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
    plan = model.plan
    record = {
        "budget": budget, "offload_requested": offload, "load_seconds": round(load_s, 2),
        "memory_in_use_after_load": after_load,
        "memory_added_by_load": after_load - base, "tok_per_s": steps / decode_s if decode_s > 0 else None,
        "bytes_per_token": per_token, "achieved_gbps": per_token * steps / decode_s / 1e9 if decode_s > 0 else None,
        "tokens": out, "engine_load_memory": engine_memory,
        # resident weights in device memory from load on, measured by the allocator, not assumed
        "resident_on_device_at_load": (engine_memory["device_bytes_added_by_load"] >= engine_memory["resident_bytes_copied"]
                                       if engine_memory else None),
    }
    if plan is not None:
        record.update({
            "offload": plan.offload if plan.streams else "none", "reason": plan.reason,
            "predicted_tok_s": dict(plan.predicted_tok_s), "cpu_min_rows": plan.cpu_min_rows,
            "cpu_layers": len(plan.cpu_layers), "resident_layers": len(plan.resident_layers),
            "figures": None if plan.figures is None else plan.figures.to_dict(),
            "plan_device_bytes": plan.device_total_bytes, "plan_host_bytes": plan.host_total_bytes,
        })
    if handoff is not None:
        cpu_s = handoff.segment_seconds.get("cpu", 0.0)
        record["hybrid"] = {"cpu_segment_ms_per_token": 1e3 * cpu_s / steps,
                            "cpu_gbps": plan.cpu_bytes_per_token * steps / cpu_s / 1e9 if cpu_s else None,
                            "handoff_bytes_per_token": handoff.bytes / steps, "handoffs_per_token": handoff.handoffs / steps,
                            "segment_seconds": dict(handoff.segment_seconds)}
    return record


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
              "probe": probe(device), "runs": [], "auto": []}
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for budget in budgets:
        runs = [run_budget(store, device, budget, args.tokens, mode) for mode in (["auto"] if budget is None else modes)]
        result["runs"] += runs
        if budget is not None:  # unconstrained: nothing to offload
            result["auto"].append(auto_choice(store, device, budget, args.tokens, runs))
    streamed = [r["tokens"] for r in result["runs"] if "tokens" in r and r.get("offload") != "cpu"]
    result["greedy_tokens_equal"] = bool(streamed) and all(t == streamed[0] for t in streamed)
    for r in result["runs"]:
        if "tokens" in r and streamed:
            r["tokens_equal_unconstrained"] = r["tokens"] == streamed[0]
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
             f"{'budget':>12} {'asked':>6} {'ran':>6} {'mem after load':>15} {'tok/s':>8} {'MB/token':>9} {'GB/s':>7} "
             f"{'of probe':>8} {'predicted':>18}"]
    for r in result["runs"]:
        budget = "none" if r["budget"] is None else f"{r['budget'] / 2**30:.3f}GiB"
        if "error" in r:
            lines.append(f"{budget:>12} {r.get('offload_requested', ''):>6} error: {r['error']}")
            continue
        predicted = " ".join(f"{k} {v:.2f}" for k, v in (r.get("predicted_tok_s") or {}).items())
        lines.append(f"{budget:>12} {r.get('offload_requested', ''):>6} {r.get('offload', ''):>6} "
                     f"{r['memory_in_use_after_load'] / 2**20:>13.1f}MB {r['tok_per_s'] or 0:>8.2f} "
                     f"{r['bytes_per_token'] / 1e6:>9.1f} {r['achieved_gbps'] or 0:>7.2f} {r.get('fraction_of_probe', 0):>8.2f} "
                     f"{predicted:>18}")
        if r.get("hybrid"):
            h = r["hybrid"]
            gbps = f"{h['cpu_gbps']:.2f} GB/s" if h.get("cpu_gbps") else "n/a"
            lines.append(f"{'':>12} CPU segment ({r['cpu_layers']} layers): {h['cpu_segment_ms_per_token']:.1f} ms/token, "
                         f"{gbps}; hand-off {h['handoff_bytes_per_token'] / 1e3:.1f} KB/token "
                         f"in {h['handoffs_per_token']:.1f} crossings; chunks of {r['cpu_min_rows']}+ rows stream")
        if r.get("engine_load_memory"):
            m = r["engine_load_memory"]
            lines.append(f"{'':>12} resident {m['resident_bytes_copied'] / 2**20:.1f} MiB copied to device at load; "
                         f"cudaMemGetInfo: +{m['device_bytes_added_by_load'] / 2**20:.1f} MiB "
                         f"(on device at load: {r['resident_on_device_at_load']})")
    for a in result.get("auto", []):
        measured = ", ".join(f"{k} {v:.2f}" for k, v in a["measured_tok_s"].items())
        picked = {True: "the faster", False: "NOT the faster", None: "n/a"}[a["picked_the_faster"]]
        lines.append(f"auto at {a['budget'] / 2**30:.3f}GiB: {a['offload']} ({picked}; measured {measured}): {a['reason']}")
    lines.append(f"greedy tokens equal across budgets (streaming and unconstrained): {result['greedy_tokens_equal']}")
    hybrid = [r for r in result["runs"] if r.get("offload") == "cpu" and "tokens" in r]
    if hybrid:
        same = sum(1 for r in hybrid if r.get("tokens_equal_unconstrained"))
        lines.append(f"offload cpu runs with the unconstrained tokens: {same} of {len(hybrid)} "
                     "(their CPU layers compute in fp32, the device's in fp16)")
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
    parser.add_argument("--modes", default="stream,cpu", help="offload modes run at each budget (auto's choice is "
                        "planned for each budget and set beside them)")
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
