"""What the store check (jmoss.store_check: headers, perms, scales, zeros, vectors) costs at load (issue #26).

Uses the CodeGen-350M-shaped store (benchmarks/make_codegen350m_store.py; built if missing) and an
int4 store made from its weights (round-to-nearest, act-order perms, int8 lm_head and wte: the
default packed store). For each, in fresh child processes, times ``jmoss.load`` plus the first
token with the checks as shipped and with them switched off (the child replaces the store_check
functions by no-ops; the fast hashes of issue #17 stay on in both), all resident and streamed under
the smallest budget (streamed groups are checked by the reader thread on their first pass). Five
runs of each alternate; the best of each is kept. The child also times the checks themselves.

    python benchmarks/bench_store_check.py [FP16_STORE]
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

CHILD = textwrap.dedent(
    """
    import json, sys, time
    import jmoss
    from jmoss import store, store_check
    path, checks, budget = sys.argv[1], sys.argv[2] == "on", json.loads(sys.argv[3])
    spent = [0.0]
    def timed(fn):
        def run(*a, **k):
            s = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[0] += time.perf_counter() - s
        return run
    if checks:
        for name in ("check_manifest", "check_config", "check_group_header", "check_group_values"):
            setattr(store_check, name, timed(getattr(store_check, name)))
        store_check.SpanValues.feed = timed(store_check.SpanValues.feed)
        real_arrays = store.Store._arrays  # the mapped read path takes the value tensors' views for the check
        store.Store._arrays = lambda self, mm, g, names=None: (timed(real_arrays)(self, mm, g, names) if names is not None
                                                               else real_arrays(self, mm, g))
    else:
        for name in ("check_manifest", "check_config", "check_group_header", "check_group_values"):
            setattr(store_check, name, lambda *a, **k: None)
        store_check.value_tensors = lambda *a, **k: []
    t1 = time.perf_counter()
    model = jmoss.load(path, device="cpu", device_memory=budget, max_seq_len=64)
    session = model.session(max_len=64)
    t2 = time.perf_counter()
    session.prefill([[1, 2, 3, 4]])
    t3 = time.perf_counter()
    print(json.dumps({"load": t2 - t1, "first_token": t3 - t2, "checks": spent[0]}))
    """
)


def int4_store(fp16: Path, out: Path) -> Path:
    """The fp16 store's weights as the default packed int4 store (what `jmoss convert --quantize int4` writes)."""
    from jmoss import layout
    from jmoss.config import MossConfig
    from jmoss.converters import gptq
    from jmoss.store import MANIFEST, Store, write_store_from_groups

    if (out / MANIFEST).is_file():
        return out
    src = Store.open(fp16)
    config = layout.resolved(MossConfig.from_dict({**src.config.to_dict(), "wbits": 4, "groupsize": 128}))
    rng = np.random.default_rng(0)
    groups = {}
    for g in layout.all_groups(config):
        arrays = {}
        bits = layout.group_bits(config, g)
        for name, array in src.group(g).items():
            prefix = name[: -len(".weight")]
            if bits and name.endswith(".weight") and prefix in (*layout.QUANT_LINEARS, layout.PACKABLE.get(g)):
                k = array.shape[1]
                perm = rng.permutation(k).astype(np.int32) if isinstance(g, int) else np.arange(k, dtype=np.int32)
                parts = [gptq.quantize_rows(np.asarray(array[i : i + 4096])[:, perm], bits, 128)
                         for i in range(0, array.shape[0], 4096)]
                arrays.update({f"{prefix}.perm": perm, f"{prefix}.qweight": np.concatenate([p[0] for p in parts]),
                               f"{prefix}.scales": np.concatenate([p[1] for p in parts]),
                               f"{prefix}.zeros": np.concatenate([p[2] for p in parts])})
            else:
                arrays[name] = np.asarray(array)
        groups[g] = arrays
    return write_store_from_groups(out, config, groups, source={"id": f"{fp16} as int4", "quantization": {"method": "rtn"}})


def measure(path: Path, stream: bool) -> str:
    budget = None
    if stream:
        from jmoss.placement import plan_placement
        from jmoss.store import Store

        config = Store.open(path).config
        budget = plan_placement(config, device="cpu", device_memory=1 << 40, host_memory=None, max_seq_len=64).minimum_device_bytes
    best: dict[str, dict[str, float]] = {}
    for _ in range(5):
        for checks in ("on", "off"):
            out = subprocess.run([sys.executable, "-c", CHILD, str(path), checks, json.dumps(budget)],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            best[checks] = {k: min(v, best.get(checks, {}).get(k, v)) for k, v in r.items()}
    on, off = best["on"], best["off"]
    total_on, total_off = on["load"] + on["first_token"], off["load"] + off["first_token"]
    size = sum(p.stat().st_size for p in path.iterdir())
    return "\n".join([
        f"{path.name}: {size / 1e6:.0f} MB, {'streamed (minimum budget)' if stream else 'all resident'}",
        f"  load + first token: checks on {total_on * 1e3:8.1f} ms   off {total_off * 1e3:8.1f} ms   "
        f"A/B {100 * (total_on - total_off) / total_off:+.1f}% (noisy on a shared machine)",
        f"  time inside the checks (best run): {on['checks'] * 1e3:.1f} ms = {100 * on['checks'] / total_on:.1f}% "
        "of load + first token",
    ])


def main() -> None:
    from jmoss.home import jmoss_home

    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    fp16 = Path(args[0]) if args else jmoss_home() / "bench-stores" / "codegen-350M-random"
    if not fp16.is_dir():
        sys.path.insert(0, str(Path(__file__).parent))
        from make_codegen350m_store import build

        build(fp16)
    int4 = int4_store(fp16, Path(os.environ.get("TMPDIR", "/tmp")) / "jmoss-bench-check-int4")
    load = os.getloadavg()
    print(f"python benchmarks/bench_store_check.py {fp16}  ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f})")
    for path in (fp16, int4):
        for stream in (False, True):
            print(measure(path, stream), flush=True)


if __name__ == "__main__":
    main()
