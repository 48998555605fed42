"""What the engines and the session allocate is exactly what the plan bills, tier by tier.

A fully resident fp16 CPU load holds its weights as the store's mapped pages: measured from outside
in a child process, the anonymous memory it allocates beyond a 1-layer baseline stays under 10% of
the weights (the pages are the page cache's, counted as the plan's resident weights all the same);
copied into 2 MiB pages (JMOSS_WEIGHT_PAGES=copied) it is the weights once, never twice.

CPU: every tier jmoss.load can choose (all resident, some layers streamed from disk, everything
streamed at the minimum budget), in fp16 and fp32, against the bytes the plan names (resident
weights, staging slots, KV cache in the plan's dtype and length). CUDA cannot run here, so its
slot allocation is run against a fake jittor that records what it is asked to allocate, for a
plan that streams the head (a layer Var set and a head Var set per slot).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import jmoss
from jmoss import layout
from jmoss.engine.cpu import StreamingWeights
from jmoss.engine.cuda import CudaStreamingWeights, allocate_slots
from jmoss.engine.resident import ResidentWeights
from jmoss.errors import BudgetError
from jmoss.placement import Placement, plan_placement, slot_allocation
from jmoss.store import Store
from test_engine import BIG, cached_store, write_random_store

SHAPE = dict(n_embd=64, n_head=4, rotary_dim=8, n_layer=4, vocab_size=512, n_positions=64)
PROMPT = [[7, 8, 9, 10, 11, 12]]


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    return write_random_store(tmp_path_factory.mktemp("accounting") / "store", SHAPE)


def _probe(store_path: Path, dtype: str, kv_dtype: str = "float32"):
    config = Store.open(store_path).config
    return plan_placement(config, device="cpu", device_memory=None, host_memory=None, kv_dtype=kv_dtype,
                          weight_itemsize=2 if dtype == "float16" else 4)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_every_cpu_tier_allocates_what_the_plan_bills(store_path, dtype):
    probe = _probe(store_path, dtype)
    layer = probe.placements[1].nbytes
    budgets = {"resident": None, "some streamed": probe.minimum_device_bytes + 2 * layer + layer,
               "all streamed": probe.minimum_device_bytes}
    tokens = {}
    for tier, budget in budgets.items():
        model = jmoss.load(store_path, device="cpu", dtype=dtype, device_memory=budget)
        plan, weights = model.plan, model.weights
        streamed = [p.group for p in plan.placements if p.group != layout.EMBED and p.where != "device"]
        if tier == "resident":
            assert isinstance(weights, ResidentWeights) and not streamed
        else:
            assert isinstance(weights, StreamingWeights) and streamed
            assert (tier == "all streamed") == (plan.resident_bytes == 0), tier
        memory = weights.memory()
        assert memory["resident_weights"] == plan.resident_bytes, tier
        assert memory.get("staging_slots", 0) == plan.staging_bytes, tier
        session = model.session()
        assert (session.batch, session.max_len) == (plan.batch, plan.max_seq_len)
        assert session.cache.nbytes == plan.kv_bytes and session.cache.dtype == plan.kv_dtype
        assert session.prefill_chunk == plan.prefill_chunk
        logits = session.prefill(PROMPT)
        tokens[tier] = [int(np.argmax(logits[0]))]
        for _ in range(3):
            tokens[tier].append(int(np.argmax(session.decode([tokens[tier][-1]])[0])))
        if tier != "resident":
            weights.close()
    assert tokens["resident"] == tokens["some streamed"] == tokens["all streamed"]


def test_load_plans_the_kv_cache_in_the_dtype_it_allocates(store_path):
    model = jmoss.load(store_path, device="cpu", dtype="float16", compute_dtype="float16", max_seq_len=40)
    assert model.plan.kv_dtype == "float16" and model.plan.max_seq_len == 40
    session = model.session()
    assert session.cache.dtype == "float16" and session.max_len == 40
    assert session.cache.nbytes == model.plan.kv_bytes == _probe(store_path, "float16", "float16").kv_bytes * 40 // 64


class FakeVar:
    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), str(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def sync(self) -> None:
        pass


class FakeJittor:
    """Records every ``jt.empty`` the CUDA engine makes (its device allocations)."""

    def __init__(self):
        self.allocated: list[FakeVar] = []

    def empty(self, shape, dtype):
        var = FakeVar(shape, dtype)
        self.allocated.append(var)
        return var


def _cuda_plan_streaming_the_head(store: Store):
    """A cuda plan with every layer and the head in pinned host memory, two slots."""
    config = store.config
    base = plan_placement(config, device="cuda", device_memory=None, host_memory=None)
    sizes = {p.group: p.nbytes for p in base.placements}
    streamed = [g for g in layout.all_groups(config) if g != layout.EMBED]
    placements = tuple(Placement(p.group, "host", p.nbytes) for p in base.placements)
    return dataclasses.replace(base, placements=placements, prefetch_depth=2,
                               staging_slot_bytes=max(sizes[g] for g in streamed),
                               slot_layouts=slot_allocation("cuda", streamed, sizes))


def test_cuda_slot_allocation_equals_the_plan_for_a_plan_streaming_the_head(store_path):
    store = Store.open(store_path)
    plan = _cuda_plan_streaming_the_head(store)
    layer_bytes, head_bytes = plan.placements[1].nbytes, plan.placements[-1].nbytes
    assert plan.slot_layouts == {"layer": layer_bytes, "head": head_bytes}
    assert plan.staging_bytes == 2 * (layer_bytes + head_bytes)  # both sets, not the larger one
    assert plan.device_total_bytes == plan.kv_bytes + plan.work_bytes + plan.reserve_bytes + plan.staging_bytes

    jt = FakeJittor()
    offsets = {g: store.tensor_offsets(g) for g in layout.all_groups(store.config) if g != layout.EMBED}
    pointers = iter(range(1, 10_000))
    slot_vars, slot_ptrs, total = allocate_slots(jt, plan, offsets, lambda var: next(pointers))
    assert sum(v.nbytes for v in jt.allocated) == total == plan.staging_bytes
    assert [sorted(s) for s in slot_vars] == [["head", "layer"]] * 2
    for slot in slot_vars:
        assert {n: (v.shape, v.dtype) for n, v in slot["layer"].items()} == {
            n: (tuple(shape), dt) for n, (_, shape, dt) in offsets[0].items()}
        assert {n: v.shape for n, v in slot["head"].items()} == {
            n: tuple(shape) for n, (_, shape, _) in offsets[layout.HEAD].items()}
    assert len({p for s in slot_ptrs for group in s.values() for p in group.values()}) == len(jt.allocated)

    engine = CudaStreamingWeights.__new__(CudaStreamingWeights)  # memory() of a built engine
    engine._slot_nbytes, engine._host, engine._staging = total, {}, []
    assert engine.memory()["device_slots"] == plan.staging_bytes


def test_cuda_planner_plans_and_allocation_agree_at_the_minimum_budget(store_path):
    store = Store.open(store_path)
    probe = plan_placement(store.config, device="cuda", device_memory=None, host_memory=None)
    plan = plan_placement(store.config, device="cuda", device_memory=probe.minimum_device_bytes, host_memory=None)
    assert plan.prefetch_depth == 1 and plan.device_total_bytes <= probe.minimum_device_bytes
    streamed = [g for g in layout.all_groups(store.config) if g != layout.EMBED and g not in plan.groups_on("device")]
    jt = FakeJittor()
    _, _, total = allocate_slots(jt, plan, {g: store.tensor_offsets(g) for g in streamed}, id)
    assert total == sum(v.nbytes for v in jt.allocated) == plan.staging_bytes


def test_cuda_slots_refuse_a_plan_made_for_other_sizes(store_path):
    store = Store.open(store_path)
    plan = _cuda_plan_streaming_the_head(store)
    wrong = dataclasses.replace(plan, slot_layouts={"layer": plan.slot_layouts["layer"]})  # head set not billed
    jt = FakeJittor()
    offsets = {g: store.tensor_offsets(g) for g in layout.all_groups(store.config) if g != layout.EMBED}
    with pytest.raises(BudgetError, match="do not match"):
        allocate_slots(jt, wrong, offsets, id)
    assert jt.allocated == []  # refused before any device memory is taken


RESIDENT_CHILD = """
import json, os, sys
import numpy as np
os.environ["JMOSS_WEIGHT_PAGES"] = sys.argv[2]
import jmoss
model = jmoss.load(sys.argv[1], device="cpu", dtype="float16", max_seq_len=32)
session = model.session(max_len=32)
logits = session.prefill([[int(t) for t in np.arange(16) % model.config.vocab_size]])
session.decode([int(np.argmax(logits[0]))])
print("RESULT " + json.dumps({"mapped": bool(model.weights.mapped), "resident": model.plan.resident_bytes,
                             "buffers": len(model.weights._buffers)}))
from jmoss.bench import stop_for_measurement
stop_for_measurement()
"""


def _resident_child(store: Path, pages: str = "mapped") -> dict:
    import json
    import sys
    import tempfile

    from jmoss.bench import spawn_measured_memory

    with tempfile.TemporaryFile("w+") as log:
        code, memory = spawn_measured_memory([sys.executable, "-c", RESIDENT_CHILD, str(store), pages], log=log)
        log.seek(0)
        out = log.read()
    assert code == 0 and memory["peak_rss"] is not None, out[-3000:]
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    return {**result, **memory}


def test_a_resident_load_allocates_under_a_tenth_of_its_weights_beyond_the_baseline(report):
    big = cached_store(BIG)  # 1.0 GB of fp16 weights (shared with test_engine)
    baseline = _resident_child(cached_store({**BIG, "n_layer": 1}))
    run = _resident_child(big)
    copied = _resident_child(big, "copied")  # JMOSS_WEIGHT_PAGES=copied: one copy in 2 MiB pages, never two
    weights = run["resident"]
    assert run["mapped"] and baseline["mapped"] and not copied["mapped"]
    extra_anon = run["peak_anon"] - baseline["peak_anon"]
    copy_anon = copied["peak_anon"] - baseline["peak_anon"]
    report(f"resident load of {weights / 2**20:.0f} MiB of fp16 weights: peak anonymous memory "
           f"{run['peak_anon'] / 2**20:.0f} MiB vs {baseline['peak_anon'] / 2**20:.0f} MiB for the 1-layer baseline "
           f"(+{extra_anon / weights:.1%} of the weights); peak RSS {run['peak_rss'] / 2**20:.0f} MiB, of which "
           f"{run['file_at_end'] / 2**20:.0f} MiB mapped store pages at the end; copied into 2 MiB pages: "
           f"+{copy_anon / weights:.1%} of the weights in anonymous memory")
    assert extra_anon <= 0.10 * weights, (extra_anon, weights)
    assert run["file_at_end"] >= 0.9 * weights  # the weights are in the process as mapped file pages
    # each group's buffer ends in a 2 MiB page that its last bytes touch whole
    assert 0.9 * weights <= copy_anon <= 1.05 * weights + copied["buffers"] * (2 << 20), (copy_anon, weights)
