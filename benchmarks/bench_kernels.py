"""Kernel-level benchmark: jmoss.kernels.linear against torch and jittor on decode/prefill shapes.

Every implementation of a shape runs interleaved in the same rounds (the machine is shared, so
side-by-side rounds are the only fair comparison), and the table shows medians. "GB/s" is weight
bytes actually read per second (fp16 weights: 2 B/param; the fp32 rows read twice that), next to
the memory-read bound measured by the same kernels' threads on a 1 GiB buffer.

    python benchmarks/bench_kernels.py [--rounds 7] [--threads N] [--quick]

Shapes: CodeGen-350M's decode GEMVs (qkv 1024->3072, fc_in 1024->4096, fc_out 4096->1024,
lm_head 1024->51200), the 16B-model GEMV 6144->18432, and prefill GEMMs of 64 and 128 tokens.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time
from typing import Callable

import numpy as np

from jmoss.jittor_setup import get_jittor

jt = get_jittor("cpu")

from jmoss import kernels  # noqa: E402  (after jittor is set up)

SHAPES = [  # (M, K, N, label)
    (1, 1024, 3072, "350M qkv"),
    (1, 1024, 4096, "350M fc_in"),
    (1, 4096, 1024, "350M fc_out"),
    (1, 1024, 51200, "350M lm_head"),
    (1, 6144, 18432, "16B fc_in"),
    (64, 1024, 4096, "prefill 64 fc_in"),
    (128, 1024, 3072, "prefill 128 qkv"),
]
SLOW_JITTOR_FP16_BYTES = 64 << 20  # jittor's fp16 matmul runs at ~0.2 GB/s (4-6 s for a 64-token GEMM): GEMV only


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def impls(m: int, k: int, n: int, threads: int) -> dict[str, tuple[Callable[[], object], int]]:
    """name -> (call, weight bytes it reads). Weights and inputs are built once, outside timing."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    w16 = (rng.standard_normal((n, k), dtype=np.float32) * 0.02).astype(np.float16)
    x = rng.standard_normal((m, k), dtype=np.float32)
    wj, xj = jt.array(w16), jt.array(x)
    wj32t = jt.array(w16.astype(np.float32).T.copy())  # jittor's fast layout is [K, N]
    wj16t = jt.array(w16.T.copy())
    jt.sync([wj, xj, wj32t, wj16t])
    tw16 = torch.from_numpy(w16)
    tw32 = tw16.float()
    twbf = tw16.bfloat16()
    tx = torch.from_numpy(x)
    tx16, txbf = tx.half(), tx.bfloat16()
    torch.set_num_threads(threads)

    def jmoss_call(t: int, amx: bool = True) -> Callable[[], object]:
        def call() -> object:
            with kernels.configured(threads=t, amx=amx):
                return kernels.linear(xj, wj).sync()

        return call

    out: dict[str, tuple[Callable[[], object], int]] = {
        f"jmoss fp16 ({threads}T)": (jmoss_call(threads), w16.nbytes),
        "jmoss fp16 (1T)": (jmoss_call(1), w16.nbytes),
        "torch F.linear fp16": (lambda: F.linear(tx16, tw16), w16.nbytes),
        "torch F.linear bf16": (lambda: F.linear(txbf, twbf), w16.nbytes),
        "torch F.linear fp32": (lambda: F.linear(tx, tw32), 2 * w16.nbytes),
        "jittor matmul fp32 [K,N]": (lambda: jt.matmul(xj, wj32t).sync(), 2 * w16.nbytes),
    }
    if w16.nbytes <= SLOW_JITTOR_FP16_BYTES and m == 1:
        out["jittor matmul fp16 [K,N]"] = (lambda: jt.matmul(xj.float16(), wj16t).sync(), w16.nbytes)
    if m >= kernels.cpu.AMX_MIN_M and kernels.amx_ready():  # prefill: AMX bf16x3 vs the fp32-FMA GEMM
        out[f"jmoss fp16 fp32-FMA ({threads}T)"] = (jmoss_call(threads, amx=False), w16.nbytes)
    if threads == 1:
        del out["jmoss fp16 (1T)"]
    return out


def bench_shape(m: int, k: int, n: int, threads: int, rounds: int) -> list[tuple[str, float, float]]:
    calls = impls(m, k, n, threads)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for fn, _ in calls.values():  # compile / warm caches
        fn()
    for _ in range(rounds):
        for name, (fn, _) in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    rows = []
    for name, (_, nbytes) in calls.items():
        med = float(np.median(times[name]))
        rows.append((name, med, nbytes / med / 1e9))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per shape (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="threads for jmoss and torch (default: all usable)")
    parser.add_argument("--quick", action="store_true", help="350M decode shapes only")
    args = parser.parse_args()
    threads = args.threads or len(os.sched_getaffinity(0))
    info = None
    with kernels.configured(threads=threads):
        info = kernels.info()
        probe = [kernels.memory_read_probe(1 << 30, repeats=5) for _ in range(3)]
    with kernels.configured(threads=1):
        probe1 = kernels.memory_read_probe(1 << 30, repeats=5)
    bound = float(np.median(probe))
    a = np.ones(1 << 27, np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)
    copies = []
    for _ in range(5):
        start = time.perf_counter()
        np.copyto(b, a)
        copies.append(time.perf_counter() - start)
    del a, b
    import torch

    print(f"# jmoss kernel benchmark  {time.strftime('%Y-%m-%d %H:%M:%S')}")
    print(f"# cpu: {cpu_name()}  usable cores: {len(os.sched_getaffinity(0))}  load avg: {os.getloadavg()[0]:.2f}")
    print(f"# kernels: isa={info['isa']} threads={info['threads']} (threads_used={info['threads_used']})  torch {torch.__version__} threads={threads}  jittor {jt.__version__}")
    print(f"# memory-read bound (jmoss probe, 1 GiB, {threads}T): median {bound:.1f} GB/s  (runs {', '.join(f'{p:.1f}' for p in probe)});  1T: {probe1:.1f} GB/s")
    print(f"# numpy copy 512 MiB (read+write bytes): median {2 * (1 << 29) / np.median(copies) / 1e9:.1f} GB/s")
    print(f"# medians of {args.rounds} interleaved rounds; GB/s = weight bytes read / time (meaningful for M=1); GFLOP/s for prefill")
    print()
    print(f"{'shape':<38} {'implementation':<26} {'ms':>9} {'GB/s':>7} {'% bound':>8} {'GFLOP/s':>8} {'vs torch fp16':>13}")
    shapes = [s for s in SHAPES if s[0] == 1 and s[1] <= 4096 and s[2] <= 51200] if args.quick else SHAPES
    for m, k, n, label in shapes:
        rows = bench_shape(m, k, n, threads, args.rounds)
        torch16 = next(t for name, t, _ in rows if name == "torch F.linear fp16")
        for i, (name, med, gbs) in enumerate(rows):
            shape = f"{label} [{m}x{k}]x[{n}x{k}]" if i == 0 else ""
            gflops = 2 * m * k * n / med / 1e9
            print(f"{shape:<38} {name:<26} {med * 1e3:9.3f} {gbs:7.1f} {100 * gbs / bound:7.0f}% {gflops:8.1f} {torch16 / med:12.2f}x", flush=True)
        print()


if __name__ == "__main__":
    main()
