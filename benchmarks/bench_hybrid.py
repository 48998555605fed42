"""Offload cpu on this machine: the CPU segment of a MOSS-16B-shaped store, and the predicted tok/s.

1. The CPU side of a split that keeps 17 of MOSS-16B's 34 layers on the device: the plan
   (``plan_placement(..., offload="cpu", split=(17, True))``) is built for ``--store`` (a packed
   16B-shaped store: /work/stores/moss16b-int4 or -int8; an fp16 one is 31 GiB), its CPU-tier
   layers are read into memory (``HostWeights``) and run as one ``Segment`` of the segmented
   engine on the ``CpuBackend`` (jmoss.kernels), exactly as a decode step runs them after the
   device's hand-off: a hidden state in, 17 layers, a hidden state out, KV cache growing. Printed:
   ms per token (median of ``--tokens``), the weight GB/s that is, and in the same run, before and
   after, the kernels' memory read probe (1 GiB, the bound) and their GEMV probe on this format;
   interleaved token by token with the same layers called through ``MossModel.block`` directly (no
   segment, no hand-off), so the engine's own cost shows as the ratio of the two.
2. ``jmoss info``'s predictions (decode tok/s at batch 1, offload stream and cpu, and auto's choice)
   for MOSS-16B fp16 at 8/12/16 GiB for the device machine we are lent (H200, PCIe 5) and for a
   desktop (12 GB card, PCIe 4.0 x16, dual-channel DDR5), from the stated inputs below, and the
   CPU speed at which the two modes break even.

Run under the shared lock (17 int4 layers are 4.1 GB in RAM): ``flock /work/heavy.lock python
benchmarks/bench_hybrid.py --store /work/stores/moss16b-int4 --out benchmarks/results/...``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

# Stated inputs (decimal GB/s, GFLOP/s). Only this machine's CPU figures are measured; the rest are
# the vendors' numbers derated to what copies and reads reach in practice, to be replaced by what
# benchmarks/gpu_record.py measures on the device (it records the figures the plan used).
MACHINES = {
    "H200 (PCIe 5.0 x16), its 16-core host": dict(
        link_gbps=50.0,  # pinned H2D on PCIe 5.0 x16: ~50 of 63 GB/s
        device_gbps=4000.0,  # HBM3e 4.8 TB/s nominal, ~4 TB/s read
        cpu_gbps=60.0,  # assumed: 16 server cores' share of DDR5 (not measured: no device lent)
        cpu_gflops=1200.0,  # assumed: 16 cores x ~75 GFLOP/s fp32 AVX-512
    ),
    "desktop: 12 GB card (RTX 4070 class), PCIe 4.0 x16, dual-channel DDR5-5600": dict(
        link_gbps=25.0,  # pinned H2D on PCIe 4.0 x16: ~25 of 32 GB/s
        device_gbps=504.0,  # GDDR6X, 504 GB/s nominal
        cpu_gbps=60.0,  # dual-channel DDR5-5600: 89.6 GB/s nominal, ~60-70 read by all cores
        cpu_gflops=700.0,  # 8 Zen 4 cores, ~60% of their fp32 FMA peak
    ),
}
BUDGETS_GIB = (8, 12, 16)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_segment(store_path: Path, n_device: int, tokens: int, prompt: int) -> dict:
    """The CPU segment of the split: its ms per token and GB/s beside the read probe."""
    from jmoss import kernels
    from jmoss.engine import CpuBackend, HostWeights, SegmentedModel
    from jmoss.engine.cpu import kernel_rates
    from jmoss.engine.segments import Segment
    from jmoss.jittor_setup import get_jittor
    from jmoss.model import KVCache, make_step, rotary_tables
    from jmoss.placement import plan_placement
    from jmoss.store import Store

    jt = get_jittor("cpu")
    store = Store.open(store_path)
    config = store.config
    max_len = prompt + tokens + 5
    plan = plan_placement(config, device="cuda", device_memory=None, host_memory=None, offload="cpu",
                          split=(n_device, True), max_seq_len=max_len)
    cpu_layers = plan.cpu_layers
    probe_before = kernels.memory_read_probe(1 << 30)
    rates = kernel_rates(jt, config)
    backend = CpuBackend(jt, config)
    t0 = time.perf_counter()
    weights = HostWeights(store, plan, backend)
    load_s = time.perf_counter() - t0
    segment = Segment(backend, weights, layers=tuple(cpu_layers))
    engine = SegmentedModel(config, backend, [segment], None, None, {i: backend for i in range(config.n_layer)})
    shape = (1, config.n_head, max_len, config.head_dim)

    def new_cache() -> KVCache:
        keys = [backend.zeros(shape, "float32") if i in cpu_layers else None for i in range(config.n_layer)]
        values = [backend.zeros(shape, "float32") if i in cpu_layers else None for i in range(config.n_layer)]
        return KVCache.of_layers(keys, values, 1, max_len, "float32")

    tables = rotary_tables(config)
    rng = np.random.default_rng(0)
    caches = {"segment": new_cache(), "direct": new_cache()}
    masks = {name: np.zeros((1, max_len), np.int8) for name in caches}

    def forward(how: str, start: int, width: int) -> None:
        masks[how][:, start:start + width] = 1
        positions = np.arange(start, start + width)[None, :]
        step = make_step(jt, config, tables, start, positions, masks[how])
        hidden = rng.standard_normal((1, width, config.n_embd)).astype(np.float32)  # what the device hands over
        if how == "segment":
            out = engine.forward(hidden, None, None, caches[how], step, last_only=True, logits=False)
            backend.send(out)  # the hand-off back to the device: one row
            return
        h = jt.array(hidden)
        for i in cpu_layers:
            h = backend.net.block(h, weights.layer(i), i, caches[how], step)
        h[:, -1:, :].numpy()

    warm = 4  # the prompt compiles the kernels; Jittor compiles the small ops of a decode step over a few more
    for how in caches:
        forward(how, 0, prompt)
        for t in range(warm):
            forward(how, prompt + t, 1)
    times: dict[str, list[float]] = {name: [] for name in caches}
    for t in range(tokens):
        for how in (("segment", "direct") if t % 2 == 0 else ("direct", "segment")):  # interleaved, order alternated
            t0 = time.perf_counter()
            forward(how, prompt + warm + t, 1)
            times[how].append(time.perf_counter() - t0)
    probe_after = kernels.memory_read_probe(1 << 30)
    weights.close()
    ms = 1e3 * float(np.median(times["segment"]))
    direct_ms = 1e3 * float(np.median(times["direct"]))
    layer_bytes = plan.cpu_bytes_per_token
    return {"store": str(store_path), "format": f"int{config.wbits}" if config.wbits in (4, 8) else "fp16",
            "cpu_layers": f"{cpu_layers[0]}-{cpu_layers[-1]} ({len(cpu_layers)} of {config.n_layer})",
            "weight_bytes_per_token": layer_bytes, "load_seconds": load_s, "ms_per_token": ms,
            "ms_min": 1e3 * min(times["segment"]), "ms_max": 1e3 * max(times["segment"]),
            "gbps": layer_bytes / (ms / 1e3) / 1e9, "direct_ms_per_token": direct_ms,
            "probe_before": probe_before, "probe_after": probe_after, "kernel_rates": rates,
            "threads": kernels.info()["threads"], "tokens": tokens, "prompt": prompt}


def predictions(config_path: Path) -> list[str]:
    """jmoss info's expected decode tok/s, both modes, for each stated machine and budget."""
    from jmoss.config import MossConfig
    from jmoss.placement import Figures, plan_placement, predict_decode_tok_s

    config = MossConfig.from_json_file(config_path)
    lines = []
    for machine, values in MACHINES.items():
        figures = Figures(**values, source="stated")
        lines.append(f"{machine}: {figures.describe()}")
        lines.append(f"  {'budget':>7} {'stream':>8} {'cpu':>8}  {'auto':>6} {'device/CPU layers':>18} "
                     f"{'CPU GB/s to break even':>24}")
        for gib in BUDGETS_GIB:
            budget = gib << 30
            plans = {mode: plan_placement(config, device="cuda", device_memory=budget, host_memory=None, offload=mode,
                                          figures=figures) for mode in ("stream", "cpu", "auto")}
            stream, cpu = plans["stream"].predicted_tok_s["stream"], plans["cpu"].predicted_tok_s["cpu"]
            split = f"{len(plans['cpu'].resident_layers)}/{len(plans['cpu'].cpu_layers)}"
            lo, hi = 0.1, 1000.0  # bisect the CPU GB/s at which offload cpu matches streaming
            for _ in range(60):
                mid = (lo * hi) ** 0.5
                trial = Figures(**{**values, "cpu_gbps": mid})
                plan = plan_placement(config, device="cuda", device_memory=budget, host_memory=None, offload="cpu",
                                      figures=trial)
                if predict_decode_tok_s(plan, config, trial) > stream:
                    hi = mid
                else:
                    lo = mid
            lines.append(f"  {gib:>4}GiB {stream:>8.2f} {cpu:>8.2f}  {plans['auto'].offload:>6} {split:>18} {hi:>24.1f}")
        lines.append(f"  (reproduce: jmoss info MOSS --device cuda --device-memory 12GiB --link-gbps {values['link_gbps']:g} "
                     f"--cpu-gbps {values['cpu_gbps']:g} --cpu-gflops {values['cpu_gflops']:g} "
                     f"--device-gbps {values['device_gbps']:g})")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("/work/stores/moss16b-int4"))
    parser.add_argument("--config", type=Path, default=REPO.parent / "shared" / "assets" / "moss-moon-003-sft"
                        / "config.json", help="MOSS-16B's config.json (fp16) for the predictions")
    parser.add_argument("--device-layers", type=int, default=17)
    parser.add_argument("--tokens", type=int, default=12)
    parser.add_argument("--prompt", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="also write the text here")
    parser.add_argument("--skip-segment", action="store_true", help="only the predictions")
    args = parser.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    cpu_name = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("model name")), platform.processor())
    lines = [f"bench_hybrid: {datetime.date.today()} commit {commit}; {cpu_name}, {os.cpu_count()} CPUs; "
             f"load average before {load_average()}"]
    if not args.skip_segment:
        r = cpu_segment(args.store, args.device_layers, args.tokens, args.prompt)
        rates = r["kernel_rates"]
        lines += [
            f"CPU segment: {r['store']} ({r['format']}), layers {r['cpu_layers']} on the CPU, {r['threads']} threads; "
            f"read into RAM in {r['load_seconds']:.1f} s",
            f"  decode: {r['ms_per_token']:.1f} ms/token (median of {r['tokens']}; min {r['ms_min']:.1f}, max "
            f"{r['ms_max']:.1f}) for {r['weight_bytes_per_token'] / 1e9:.2f} GB of weights = {r['gbps']:.2f} GB/s",
            f"  the same layers through MossModel.block directly, interleaved: {r['direct_ms_per_token']:.1f} ms/token "
            f"(segment / direct = {r['ms_per_token'] / r['direct_ms_per_token']:.3f})",
            f"  memory read probe (1 GiB, same threads): {r['probe_before']:.2f} GB/s before, {r['probe_after']:.2f} after; "
            f"the segment reaches {r['gbps'] / max(r['probe_before'], r['probe_after']):.0%} of the better",
            f"  the kernels' own probe on this format: GEMV {rates['gbps']:.2f} GB/s, {rates['gflops']:.1f} GFLOP/s "
            f"({rates['what']})",
            f"  load average after: {load_average()}",
        ]
    lines.append("")
    lines.append("predicted decode tok/s at batch 1, MOSS-16B fp16 (jmoss info --offload stream|cpu|auto), stated inputs:")
    lines += predictions(args.config)
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
