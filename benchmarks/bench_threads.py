"""CPU decode at 1 and 2 threads, on a quiet machine and beside CPU-bound competitors, side by side.

For each STORE (MOSS-16B-shaped int4 / int8 ones: benchmarks/random_store.py writes them), one
fresh process loads it resident, then measures, interleaved over ``--rounds``:

- the memory read probe (``kernels.memory_read_probe``, 1 GiB, the kernels' own threads) at 1
  and 2 threads: the bound a batch-1 decode is judged against, measured in the same process;
- greedy batch-1 decode tok/s at 1 and 2 threads, quiet;
- the same with one CPU-bound competitor per core (``python -c 'while True: pass'``, pinned
  nowhere), started by this script for the loaded measurements only and stopped after them.

GB/s = the weight bytes one token reads (layers and head, as stored) x tok/s. Printed: the
median of the rounds for each configuration, the fraction of the probe, and the issue's checks
(quiet >= 85% of the probe; loaded 2T >= 0.45x quiet 2T and >= loaded 1T). The machine's load
average is printed before and after each store: figures taken beside other work are noisy, and
"quiet" is only as quiet as the machine was.

    flock /work/heavy.lock python benchmarks/bench_threads.py /work/stores/moss16b-int4 /work/stores/moss16b-int8 \\
        [--tokens 4] [--rounds 3] [--compute fp32,int8] [--out benchmarks/results/threads-16b.txt]

``--compute fp32,int8`` measures each configuration in each kernels quant_compute mode, interleaved
in the same process (int8: x quantized to 8 bits per block of 32 in the packed decode kernels,
approximate; rows are then named e.g. "2T quiet int8").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    """The CPU's model name and the vector ISA the kernels can use on it."""
    name, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name == "unknown CPU":
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name}, {len(os.sched_getaffinity(0))} CPUs, {isa}{' + AMX' if 'amx_tile' in flags else ''}"


def commit() -> str:
    """The commit measured: git's, or $JMOSS_BENCH_COMMIT for a copy of the tree outside git."""
    if os.environ.get("JMOSS_BENCH_COMMIT"):
        return os.environ["JMOSS_BENCH_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        return head + ("+uncommitted" if dirty else "")
    except OSError:
        return "unknown"


def run_child(cmd: list[str]) -> tuple[dict | None, subprocess.CompletedProcess]:
    """Run a benchmark's child process (a fresh interpreter per store or configuration): its
    result is the JSON it prints on the stdout line that starts with RESULT, None if it printed none."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    return next((json.loads(line[len("RESULT"):]) for line in lines if line.startswith("RESULT")), None), proc


def load_average() -> str:
    return "load average %.2f, %.2f, %.2f" % os.getloadavg()


@contextlib.contextmanager
def competitors(count: int | None = None) -> Iterator[int]:
    """One CPU-bound process per CPU this process may run on (or ``count``), for the block.

    The same as jmoss.bench.busy_competitors, kept here so that this script also measures trees
    from before it existed (the before/after runs)."""
    count = count or len(os.sched_getaffinity(0))
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(1.0)  # let the scheduler place them
        yield count
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


# ------------------------------------------------------------------------------ child: one store


def _key(t: int, loaded: bool, compute: str, computes: list[str]) -> str:
    return f"{t}T {'loaded' if loaded else 'quiet'}" + (f" {compute}" if computes != ["fp32"] else "")


def measure(store: str, threads: list[int], tokens: int, rounds: int, computes: list[str] | None = None) -> dict:
    import jmoss
    from jmoss import kernels
    from jmoss.bench import huge_page_share, resident_weight_bytes

    t0 = time.perf_counter()
    model = jmoss.load(store, device="cpu")
    load_s = time.perf_counter() - t0
    if hasattr(model.weights, "wait_for_copy"):  # weights being copied into 2 MiB pages: measure the copy
        model.weights.wait_for_copy()
    weight_bytes = resident_weight_bytes(model)
    computes = computes or ["fp32"]
    configs = [(t, False) for t in threads] + [(t, True) for t in sorted(threads, reverse=True)]
    steps = 2 + rounds * len(configs) * len(computes) * tokens + len(threads) * len(computes)
    session = model.session(max_len=4 + steps)
    logits = session.prefill([[11, 12, 13, 14]])
    token = int(np.argmax(logits[0]))
    for t in threads:  # compile and warm both thread counts (and compute modes)
        for c in computes:
            with kernels.configured(threads=t, quant_compute=c):
                token = int(np.argmax(session.decode([token])[0]))

    decode: dict[str, list[float]] = {}
    probe: dict[str, list[float]] = {}
    for _ in range(rounds):
        for loaded in (False, True):
            with competitors() if loaded else contextlib.nullcontext():
                for t, want_loaded in configs:
                    if want_loaded != loaded:
                        continue
                    for c in computes:
                        key = _key(t, loaded, c, computes)
                        probe.setdefault(key, []).append(kernels.memory_read_probe(1 << 30, repeats=3, threads=t))
                        with kernels.configured(threads=t, quant_compute=c):
                            start = time.perf_counter()
                            for _ in range(tokens):
                                token = int(np.argmax(session.decode([token])[0]))
                            decode.setdefault(key, []).append(tokens / (time.perf_counter() - start))
    return {"store": store, "load_s": load_s, "weight_bytes": weight_bytes, "isa": kernels.isa_path(),
            "decode": decode, "probe": probe, "huge_share": huge_page_share(weight_bytes)}


# ------------------------------------------------------------------------------ parent


def report(result: dict, threads: list[int], computes: list[str] | None = None) -> list[str]:
    med = {k: statistics.median(v) for k, v in result["decode"].items()}
    probe = {k: statistics.median(v) for k, v in result["probe"].items()}
    gb = result["weight_bytes"] / 1e9
    share = result.get("huge_share")
    lines = [f"## {result['store']}: {gb:.2f} GB read per token, kernels {result['isa']}, loaded in {result['load_s']:.0f} s"
             + (f", {share:.0%} of it mapped in 2 MiB pages" if share is not None else "")]
    lines.append(f"{'config':<12} {'tok/s':>7} {'GB/s':>6} {'probe GB/s':>10} {'of probe':>8}   per round tok/s")
    for key in result["decode"]:
        gbps = med[key] * gb
        lines.append(f"{key:<12} {med[key]:7.3f} {gbps:6.2f} {probe[key]:10.2f} {gbps / probe[key]:8.0%}   "
                     + " ".join(f"{v:.3f}" for v in result["decode"][key]))
    checks = []
    computes = computes or ["fp32"]
    for c in computes:
        for t in threads:
            q = _key(t, False, c, computes)
            checks.append((f"{q} >= 85% of its probe", med[q] * gb / probe[q] >= 0.85, f"{med[q] * gb / probe[q]:.0%}"))
        if 2 in threads and 1 in threads:
            l2, q2, l1 = (med[_key(2, True, c, computes)], med[_key(2, False, c, computes)],
                          med[_key(1, True, c, computes)])
            checks.append((_key(2, True, c, computes) + " >= 0.45x quiet", l2 >= 0.45 * q2, f"{l2 / q2:.2f}x"))
            checks.append((_key(2, True, c, computes) + " >= 1T loaded", l2 >= l1, f"{l2 / l1:.2f}x"))
    if "fp32" in computes and "int8" in computes:
        for t in threads:
            a, b = med[_key(t, False, "int8", computes)], med[_key(t, False, "fp32", computes)]
            checks.append((f"{t}T quiet int8 / fp32 (same process)", True, f"{a / b:.2f}x"))
    for what, ok, value in checks:
        lines.append(f"check: {what}: {value} {'PASS' if ok else 'FAIL'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stores", nargs="+")
    parser.add_argument("--threads", default="1,2", help="thread counts, comma-separated (default 1,2)")
    parser.add_argument("--tokens", type=int, default=4, help="decode tokens per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compute", default="fp32",
                        help="kernels quant_compute modes to measure side by side, comma-separated (fp32, int8)")
    parser.add_argument("--out", type=Path, default=None, help="append the report to this file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    computes = [c.strip() for c in args.compute.split(",") if c.strip()]
    if args.child:
        print("RESULT" + json.dumps(measure(args.stores[0], threads, args.tokens, args.rounds, computes)), flush=True)
        return 0
    lines = [f"# ==== {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit()}",
             f"# CPU: {cpu_name()}; {args.rounds} interleaved rounds of {args.tokens} greedy decode tokens per configuration;",
             "# loaded = one 'while True: pass' process per CPU, started by this script for those rows only",
             "$ python benchmarks/bench_threads.py " + " ".join(argv if argv is not None else sys.argv[1:])]
    print("\n".join(lines), flush=True)
    for store in args.stores:
        before = load_average()
        cmd = [sys.executable, __file__, store, "--child", "--threads", args.threads, "--tokens", str(args.tokens),
               "--rounds", str(args.rounds), "--compute", args.compute]
        result, proc = run_child(cmd)
        if result is None:
            section = [f"## {store}: failed (exit {proc.returncode})", *proc.stderr.strip().splitlines()[-15:]]
        else:
            section = report(result, threads, computes)
        section.append(f"# {before} before, {load_average()} after")
        print("\n".join(section), flush=True)
        lines += section
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
