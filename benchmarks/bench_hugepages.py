"""Decode with the weights in 2 MiB pages against 4 KiB pages, same store, same cached pages.

jmoss.store.Store.mapping asks for 2 MiB pages (MADV_HUGEPAGE). Whether a mapping gets them depends
on the page cache: Linux 6.16+ caches ext4/XFS files in large folios when it reads them from disk,
and then maps them whole; pages cached as a program wrote them stay 4 KiB. Where the weights fit in
RAM twice, jmoss copies them into 2 MiB pages of its own (jmoss.engine.resident.weight_pages). This
script loads the store in child processes, in turn: "mapped" (JMOSS_WEIGHT_PAGES=mapped, as the
page cache allows), "4KiB" (mapped with MADV_NOHUGEPAGE instead: 4 KiB page table entries over the
same folios) and "copied" (JMOSS_WEIGHT_PAGES=copied: read into 2 MiB pages at load), and prints
each one's load time, share of the weights in 2 MiB pages and greedy decode tok/s at 2 and 1
threads. Drop the store from the page cache first (e.g. ``echo 1 > /proc/sys/vm/drop_caches``) so
that the next load reads it back in large folios.

    flock /work/heavy.lock python benchmarks/bench_hugepages.py STORE [--rounds 3] [--tokens 10] [--compute int8] \\
        [--modes mapped,4KiB,copied]
"""

from __future__ import annotations

import argparse
import json
import mmap
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_threads import commit, cpu_name, load_average, run_child  # noqa: E402


MODES = ("mapped", "4KiB", "copied")


def child(store: str, mode: str, tokens: int, compute: str) -> dict:
    import os

    os.environ["JMOSS_WEIGHT_PAGES"] = "copied" if mode == "copied" else "mapped"
    import jmoss.store

    if mode == "4KiB":  # the same call jmoss makes, asking for the opposite
        advise = jmoss.store._advise
        jmoss.store._advise = lambda mm, adv: advise(mm, mmap.MADV_NOHUGEPAGE if adv == mmap.MADV_HUGEPAGE else adv)
    import jmoss
    from jmoss import kernels
    from jmoss.bench import huge_page_share, resident_weight_bytes

    start = time.perf_counter()
    model = jmoss.load(store, device="cpu")
    load_s = time.perf_counter() - start
    session = model.session(max_len=16 + 4 * tokens)
    token = int(np.argmax(session.prefill([[11, 12, 13, 14]])[0]))
    out = {"mode": mode, "huge": huge_page_share(resident_weight_bytes(model)), "load_s": load_s}
    for threads in (2, 1):
        with kernels.configured(threads=threads, quant_compute=compute):
            for _ in range(2):
                token = int(np.argmax(session.decode([token])[0]))
            start = time.perf_counter()
            for _ in range(tokens):
                token = int(np.argmax(session.decode([token])[0]))
            out[f"{threads}T"] = tokens / (time.perf_counter() - start)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=10)
    parser.add_argument("--compute", default="int8", choices=["fp32", "int8"], help="kernels quant_compute mode")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes: choose from {', '.join(MODES)}")
    if args.child:
        print("RESULT" + json.dumps(child(args.store, args.child, args.tokens, args.compute)), flush=True)
        return 0
    print(f"# bench_hugepages: {cpu_name()}, commit {commit()}, {args.store}, {args.compute} compute, "
          f"{args.tokens} tokens per figure; {load_average()}", flush=True)
    for r in range(args.rounds):
        for mode in modes:
            d, proc = run_child([sys.executable, __file__, args.store, "--child", mode, "--tokens", str(args.tokens),
                                 "--compute", args.compute])
            if proc.returncode or d is None:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            share = "?" if d["huge"] is None else f"{d['huge']:.0%}"
            print(f"round {r} {mode:>6}: loaded in {d['load_s']:.1f} s, {share} of the weights in 2 MiB pages, "
                  f"2T {d['2T']:.3f} tok/s, 1T {d['1T']:.3f} tok/s", flush=True)
    print(f"# {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
