"""Continuous batching on the CPU: aggregate decode tok/s and per-client time per token, 1-8 clients.

Each client is a thread streaming greedy tokens through its own slot of one BatchRunner (the code
path of ``jmoss serve --max-batch``'s jobs, without HTTP), all started together. Measured per
client from the second token on (the first includes the prefill): aggregate tok/s over the span
where clients decode, and p50/p95 of the intervals between a client's tokens. Two placements: the
weights streamed under a budget whose weight share is 1/4 of the weights (KV cache and work buffers
on top), and everything resident.

    python benchmarks/make_codegen350m_store.py /tmp/cg350
    python benchmarks/bench_batching.py /tmp/cg350 --tokens 32 > benchmarks/results/batching-cpu.txt
"""

from __future__ import annotations

import argparse
import platform
import statistics
import threading
import time

import jmoss
from jmoss.batching import BatchRunner
from jmoss.generation import GenerationOptions, stream_tokens
from jmoss.placement import plan_placement
from jmoss.store import Store


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run(model, clients: int, tokens: int, prompt_len: int) -> dict:
    runner = BatchRunner(model, clients, max_len=prompt_len + tokens + 1)
    opts = GenerationOptions(max_new_tokens=tokens, do_sample=False, stop=(), repetition_penalty=1.0)
    stamps: list[list[float]] = [[] for _ in range(clients)]
    barrier = threading.Barrier(clients)

    def client(i: int) -> None:
        slot = runner.acquire()
        barrier.wait()
        ids = [(7 * i + 3 * k) % 50000 + 100 for k in range(prompt_len)]

        class Mark(list):
            def append(self, token: int) -> None:  # one stamp per generated token
                stamps[i].append(time.perf_counter())
                super().append(token)

        marks = Mark()
        for _ in stream_tokens(model, slot, ids, opts, tokens_out=marks):
            pass
        runner.release(slot)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    runner.stop()
    gaps = sorted(b - a for s in stamps for a, b in zip(s[1:], s[2:]))
    start, end = max(s[0] for s in stamps), max(s[-1] for s in stamps)
    decoded = sum(sum(1 for t in s[1:] if start <= t <= end) for s in stamps)
    return {"clients": clients, "agg": decoded / (end - start), "p50": statistics.median(gaps),
            "p95": gaps[min(len(gaps) - 1, int(0.95 * len(gaps)))], "steps": runner.steps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("store")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--clients", default="1,2,4,8")
    args = ap.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    store = Store.open(args.store)
    config = store.config
    seq = args.prompt + args.tokens + 1
    resident = plan_placement(config, device="cpu", device_memory=None, host_memory=None, max_seq_len=seq,
                              batch=max(counts), weight_itemsize=2)
    fixed = resident.kv_bytes + resident.work_bytes + resident.reserve_bytes
    weight_bytes = resident.resident_bytes
    budget = fixed + weight_bytes // 4
    print(f"CPU: {_cpu()}; {len(__import__('os').sched_getaffinity(0))} cores usable; jmoss {jmoss.__version__}")
    print(f"model: CodeGen-350M shape (random weights), fp16 weights, fp32 compute; prompt {args.prompt} tokens, "
          f"{args.tokens} greedy tokens per client, all clients start together")
    for label, device_memory in (("streamed (weights budget = 1/4 of the weights)", budget), ("resident", None)):
        model = jmoss.load(args.store, device="cpu", device_memory=device_memory, max_seq_len=seq, batch=max(counts))
        plan = model.plan
        print(f"\n== {label}: device_memory {device_memory or 'none'}; streamed per step "
              f"{plan.streamed_bytes_per_token / 1e6:.0f} MB; KV {plan.kv_bytes / 1e6:.0f} MB (batch {plan.batch})")
        run(model, 1, 4, args.prompt)  # warm-up: kernels compiled, pages touched
        print(f"{'clients':>7} {'aggregate tok/s':>15} {'x of 1':>7} {'p50 ms/tok':>10} {'p95 ms/tok':>10} {'x of 1':>7}")
        base = None
        for n in counts:
            r = run(model, n, args.tokens, args.prompt)
            base = base or r
            print(f"{n:>7} {r['agg']:>15.2f} {r['agg'] / base['agg']:>7.2f} {1000 * r['p50']:>10.1f} "
                  f"{1000 * r['p95']:>10.1f} {r['p50'] / base['p50']:>7.2f}", flush=True)
        del model


if __name__ == "__main__":
    main()
