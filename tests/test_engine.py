"""The streaming engine keeps its memory promise and changes no result.

The main model here is CodeGen-shaped (n_embd 1024, 40 layers, vocab 4096): 1.0 GB of fp16
weights. It has to be that large because the planner's CPU budget includes a fixed 128 MiB
runtime reserve (jmoss.placement.RUNTIME_RESERVE), so the smallest workable budget is about
220 MiB and "weights >= 4x the budget" needs about 0.9 GB of weights. The store is written
once into $JMOSS_HOME/test-stores (about 1-2 minutes the first time) and reused.

Peak RSS is measured from outside: each run is a fresh child process that stops itself at the
end, and the parent reads its ``VmHWM`` from /proc (``jmoss.bench.spawn_measured``; wait4's
``ru_maxrss`` would include the parent's own RSS, which Linux carries across exec). The fixed overhead it is allowed on top of the budget is
Jittor's own baseline, measured the same way: a child that runs the same script on a 1-layer
model of the same shapes with no budget (interpreter + numpy + jittor core + the same compiled
kernels + one layer of weights). Allocations the budget pays for are counted once in each, so
the bound is "budget + what any jmoss process costs before it holds a model".
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from jmoss import layout
from jmoss.config import MossConfig
from jmoss.errors import BudgetError
from jmoss.jittor_setup import jmoss_home
from jmoss.sizes import MiB, format_size
from jmoss.store import MANIFEST, GroupWriter, finalize_store

BIG = dict(n_embd=1024, n_head=16, rotary_dim=32, n_layer=40, vocab_size=4096, n_positions=128)
SMALL = dict(n_embd=512, n_head=8, rotary_dim=16, n_layer=8, vocab_size=4096, n_positions=128)


def write_random_store(out: Path, shape: dict, seed: int = 0, std: float = 0.03) -> Path:
    """A valid jmoss store of random fp16 weights, written group by group (bounded memory)."""
    config = MossConfig.from_dict({**shape, "model_type": "moss", "eos_token_id": None})
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = {}
    for group in layout.all_groups(config):
        writer = GroupWriter(out, config, group)
        for name, tshape in writer.shapes.items():
            noise = rng.standard_normal(tshape, dtype=np.float32)
            if name.startswith(("ln_1.weight", "ln_f.weight")):
                array = 1 + std * noise
            elif name == "wte.weight":
                array = noise
            else:
                array = std * noise
            writer.write_tensor(name, array.astype(np.float16))
        records[group] = writer.finish()
    return finalize_store(out, config, records)


def cached_store(shape: dict, seed: int = 0) -> Path:
    """The store for ``shape``, written once under $JMOSS_HOME/test-stores and reused."""
    tag = "-".join(f"{k}{v}" for k, v in sorted(shape.items())) + f"-seed{seed}"
    path = jmoss_home() / "test-stores" / tag
    if not (path / MANIFEST).is_file():
        write_random_store(path, shape, seed)
    return path


# A child run: load with a budget, greedy-decode, report tokens and engine figures as JSON.
CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import jmoss
    path, budget, n_prompt, n_new, max_len = sys.argv[1], json.loads(sys.argv[2]), *map(int, sys.argv[3:6])
    model = jmoss.load(path, device="cpu", device_memory=budget, max_seq_len=max_len)
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, model.config.vocab_size, n_prompt)]
    session = model.session(max_len=n_prompt + n_new)
    logits = session.prefill([prompt])
    tokens = []
    for _ in range(n_new):
        tokens.append(int(np.argmax(logits[0])))
        logits = session.decode([tokens[-1]])
    plan = model.plan
    stats = getattr(model.weights, "stats", None)
    print("RESULT " + json.dumps({
        "tokens": tokens, "budget": plan.budget_bytes, "minimum": plan.minimum_device_bytes,
        "streamed_per_token": plan.disk_bytes_per_token, "resident_layers": len(plan.resident_layers),
        "engine": type(model.weights).__name__,
        "bytes_per_forward": stats.bytes_per_forward if stats else 0,
    }))
    from jmoss.bench import stop_for_measurement
    stop_for_measurement()
    """
)


def run_child(path: Path, budget, n_prompt: int = 16, n_new: int = 8, max_len: int = 128) -> dict:
    """Run CHILD in a fresh interpreter; return its RESULT and its peak RSS (bytes) measured here."""
    from jmoss.bench import spawn_measured

    with tempfile.TemporaryFile("w+") as log:
        code, peak = spawn_measured(
            [sys.executable, "-c", CHILD, str(path), json.dumps(budget), str(n_prompt), str(n_new), str(max_len)],
            log=log,
        )
        log.seek(0)
        out = log.read()
    assert code == 0 and peak is not None, out[-4000:]
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    result["peak_rss"] = peak
    return result


def test_budgeted_run_generates_the_same_tokens_within_budget_plus_jittor_baseline(report):
    big = cached_store(BIG)
    weights = sum(f.stat().st_size for f in big.glob("*.safetensors"))
    baseline_store = cached_store({**BIG, "n_layer": 1})

    free = run_child(big, None)
    budget = free["minimum"] + 24 * MiB + 1 * MiB  # one more slot than the minimum: prefetch depth 2
    assert weights >= 4 * budget, (weights, budget)
    tight = run_child(big, budget)
    baseline = run_child(baseline_store, None)

    assert tight["engine"] == "StreamingWeights" and free["engine"] != "StreamingWeights"
    assert tight["tokens"] == free["tokens"]
    overhead = baseline["peak_rss"]
    report(f"weights {weights / 1e6:.0f} MB = {weights / budget:.2f}x the budget {format_size(budget)}; "
           f"greedy tokens identical ({len(tight['tokens'])} decode steps)")
    report(f"peak RSS: budgeted {format_size(tight['peak_rss'])}, unconstrained {format_size(free['peak_rss'])}, "
           f"jittor baseline (1-layer same-shape model, no budget) {format_size(overhead)}; "
           f"bound budget + baseline = {format_size(budget + overhead)}")
    assert tight["peak_rss"] <= budget + overhead


@pytest.fixture(scope="module")
def small_store() -> Path:
    return cached_store(SMALL)


@pytest.fixture(scope="module")
def small_plan_minimum(small_store):
    from jmoss.placement import plan_placement
    from jmoss.store import Store

    store = Store.open(small_store)
    return plan_placement(store.config, device="cpu", device_memory=1 << 40, host_memory=None).minimum_device_bytes


def test_stats_match_the_plan_and_memory_is_flat_over_50_decode_steps(small_store, small_plan_minimum, report):
    import jmoss
    from jmoss.engine import StreamingWeights, rss_bytes

    model = jmoss.load(small_store, device="cpu", device_memory=small_plan_minimum + 8 * MiB)
    weights = model.weights
    assert isinstance(weights, StreamingWeights) and weights.streamed_groups
    session = model.session(max_len=64)
    logits = session.prefill([[1, 2, 3, 4]])
    rss = []
    weights.stats.reset()
    for step in range(50):
        logits = session.decode([int(np.argmax(logits[0]))])
        rss.append(rss_bytes())
    stats = weights.stats
    assert stats.forwards == 50
    assert stats.bytes_per_forward == model.plan.disk_bytes_per_token
    # The reader runs at most prefetch_depth groups ahead of what was consumed.
    slack = weights.depth * max(n for _, n in weights._spans.values())
    assert abs(stats.bytes_read - stats.bytes_consumed) <= slack
    growth = rss[-1] - rss[4]
    report(f"small model: {stats.bytes_per_forward / 1e6:.2f} MB streamed per token (plan "
           f"{model.plan.disk_bytes_per_token / 1e6:.2f}); RSS {format_size(rss[4])} after 5 steps, "
           f"{format_size(rss[-1])} after 50 (growth {growth / 1024:.0f} KiB); sync {stats.sync_seconds / 50 * 1e3:.2f} "
           f"ms/token, wait {stats.wait_seconds / 50 * 1e3:.2f} ms/token")
    assert growth < 2 * MiB, growth
    weights.close()


def test_streaming_float32_matches_float16_weights_and_resident_run(small_store, small_plan_minimum):
    import jmoss

    from jmoss.placement import plan_placement
    from jmoss.store import Store

    config = Store.open(small_store).config
    minimum32 = plan_placement(config, device="cpu", device_memory=1 << 40, host_memory=None,
                               weight_itemsize=4).minimum_device_bytes
    budget = minimum32 + 14 * MiB  # room for a second fp32 slot, no resident layer
    runs = {}
    for name, kwargs in {"fp16 streamed": dict(dtype="float16", device_memory=small_plan_minimum + 8 * MiB),
                         "fp32 streamed": dict(dtype="float32", device_memory=budget),
                         "fp32 resident": dict(dtype="float32")}.items():
        model = jmoss.load(small_store, device="cpu", **kwargs)
        assert bool(model.plan.groups_on("disk")) == ("streamed" in name)
        runs[name] = model.logits([[5, 6, 7, 8, 9]])
        if hasattr(model.weights, "close"):
            model.weights.close()
    np.testing.assert_allclose(runs["fp32 streamed"], runs["fp32 resident"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(runs["fp16 streamed"], runs["fp32 resident"], rtol=0, atol=1e-3)


def test_a_forward_abandoned_half_way_does_not_desynchronise_the_stream(small_store, small_plan_minimum):
    import jmoss

    model = jmoss.load(small_store, device="cpu", device_memory=small_plan_minimum + 8 * MiB)
    want = model.logits([[3, 1, 4, 1, 5]])
    streamed = [g for g in model.weights.streamed_groups if isinstance(g, int)]
    model.weights.layer(streamed[0])  # as if a forward raised after its first streamed layer
    model.weights.layer(streamed[1])
    np.testing.assert_array_equal(model.logits([[3, 1, 4, 1, 5]]), want)
    model.weights.close()


def test_widen_in_place_equals_astype():
    from jmoss.engine import widen_in_place

    values = np.random.default_rng(1).standard_normal(10_001).astype(np.float16)
    buf = np.empty(4 * values.size, np.uint8)
    buf[2 * values.size:] = values.view(np.uint8)
    widen_in_place(buf, values.size, np.empty(97, np.float16))
    np.testing.assert_array_equal(buf.view(np.float32), values.astype(np.float32))


def test_budget_below_the_minimum_fails_early_and_names_the_minimum(small_store, small_plan_minimum):
    import jmoss

    with pytest.raises(BudgetError) as info:
        jmoss.load(small_store, device="cpu", device_memory="50MB")
    assert f"minimum of {format_size(small_plan_minimum)}" in str(info.value)


@pytest.mark.parametrize("given", ["300MB", 300_000_000, None])
def test_load_accepts_size_strings_bytes_and_none(small_store, given):
    import jmoss

    model = jmoss.load(small_store, device="cpu", device_memory=given)
    assert model.plan.device_memory == (None if given is None else 300_000_000)
    if given is None:
        assert not model.plan.groups_on("disk")
    if hasattr(model.weights, "close"):
        model.weights.close()


def test_import_of_the_cuda_backend_needs_no_gpu():
    code = "import jmoss.engine, jmoss.engine.cuda, sys; assert 'cupy' not in sys.modules; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr
