"""What checking every store file's fast hash on first read costs (issue #17).

Writes a random ~600 MB store (or uses DIR), then in fresh child processes times ``jmoss.load``
plus the first token, and the decode tokens after it, with the checks as shipped and with them
switched off (the child replaces ``Store.span_hasher``/``check_group_span`` by no-ops and drops the
group files' fast hashes from the manifest it opened, so ``Store.mapping`` hashes nothing).
Five runs of each alternate and the best of each is kept, so the page cache is warm for both.

    python benchmarks/bench_store_hash.py [DIR] [--stream]
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

SHAPE = dict(vocab_size=50000, n_positions=256, n_embd=1024, n_layer=16, n_head=16, rotary_dim=32)

CHILD = textwrap.dedent(
    """
    import json, sys, time
    t0 = time.perf_counter()
    import jmoss
    from jmoss.store import Store
    path, checks, budget = sys.argv[1], sys.argv[2] == "on", json.loads(sys.argv[3])
    spent = [0.0]  # seconds inside the checks themselves (hashing, header re-read, compare)
    if not checks:
        Store.check_group_span = lambda self, g, data: None
        Store.span_hasher = lambda self, g: None
        opened = Store.open.__func__
        def unhashed(cls, p):  # as a store without fast hashes: mapping() then hashes nothing
            store = opened(cls, p)
            for name, record in store.manifest["files"].items():
                if name.endswith(".safetensors"):
                    record.pop("xxh3_128", None)
            return store
        Store.open = classmethod(unhashed)
    else:
        def timed(fn):
            def run(*a, **k):
                s = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    spent[0] += time.perf_counter() - s
            return run

        class Timed:
            def __init__(self, h):
                self.h = h
            def update(self, data):
                s = time.perf_counter()
                self.h.update(data)
                spent[0] += time.perf_counter() - s
            def hexdigest(self):
                return self.h.hexdigest()

        real_hasher = Store.span_hasher
        Store.span_hasher = timed(lambda self, g: (lambda h: Timed(h) if h is not None else None)(real_hasher(self, g)))
        import jmoss.store
        jmoss.store.fast_hash_mapping = timed(jmoss.store.fast_hash_mapping)  # summed over the hashing threads
        Store.finish_span_check = timed(Store.finish_span_check)
    t1 = time.perf_counter()
    model = jmoss.load(path, device="cpu", device_memory=budget, max_seq_len=64)
    session = model.session(max_len=64)
    t2 = time.perf_counter()
    session.prefill([[1, 2, 3, 4]])
    t3 = time.perf_counter()
    steps = []
    for i in range(8):
        s = time.perf_counter()
        session.decode([5 + i])
        steps.append(time.perf_counter() - s)
    print(json.dumps({"load": t2 - t1, "first_token": t3 - t2, "decode": sorted(steps)[len(steps) // 2], "checks": spent[0]}))
    """
)


def write_store(out: Path) -> Path:
    from jmoss.config import MossConfig
    from jmoss import layout
    from jmoss.store import MANIFEST, GroupWriter, finalize_store

    if (out / MANIFEST).is_file():
        return out
    config = MossConfig.from_dict({**SHAPE, "model_type": "moss", "eos_token_id": None})
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records = {}
    for group in layout.all_groups(config):
        writer = GroupWriter(out, config, group)
        for name, shape in writer.shapes.items():
            base = 1.0 if name.startswith(("ln_1.weight", "ln_f.weight")) else 0.0
            writer.write_tensor(name, (base + 0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float16))
        records[group] = writer.finish()
    return finalize_store(out, config, records)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    stream = "--stream" in sys.argv
    path = write_store(Path(args[0]) if args else Path("/tmp/jmoss-bench-hash-store"))
    size = sum(p.stat().st_size for p in path.iterdir())
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
    cost = (on["load"] + on["first_token"]) - (off["load"] + off["first_token"])
    print(f"store {size / 1e6:.0f} MB, {'streamed (minimum budget)' if stream else 'all resident'}")
    for k in ("load", "first_token", "decode"):
        print(f"  {k:12s} checks on {on[k] * 1e3:8.1f} ms   off {off[k] * 1e3:8.1f} ms")
    print(f"  load + first token, A/B: {cost * 1e3:+.1f} ms = {100 * cost / (off['load'] + off['first_token']):+.1f}% (noisy on a shared machine)")
    print(f"  time inside the checks (best run): {on['checks'] * 1e3:.1f} ms = "
          f"{100 * on['checks'] / (on['load'] + on['first_token']):.1f}% of load + first token")


if __name__ == "__main__":
    main()
