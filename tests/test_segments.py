"""The segmented engine (offload cpu) on this CPU: two backends, the numbers of one.

No GPU here. The device side is stood in for by a second ``CpuBackend`` running the same kernels
in the same dtype (fp32 activations, fp32 KV cache), with the device engine's weights (resident
groups in owned buffers, the slots large chunks stream through, read from disk). So a split
anywhere must give the single-backend run's logits (fp32, <= 1e-5) and greedy tokens: at every
layer boundary, with the head on either side, for prompt chunks below the row threshold (the CPU
computes its layers) and above it (the device computes every layer, the CPU-tier ones with
streamed weights and their attention handed to the CPU, where their KV cache lives), batch 2
with a left-padded row, on fp16 and packed int4/int8 stores. What each side allocates is what the
plan bills.

The CUDA backend's own code (the hand-off through pinned buffers, cpu-tier groups pinned once and
shared with the CPU side) runs against test_cuda_engine.py's stand-ins for the device: its
logits must equal the same split with a CPU standing in for the device with the device's math
(plain Jittor ops, fp16 activations).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import jmoss
from fixtures_checkpoints import save_gptq_checkpoint, tiny_model
from jmoss import layout
from jmoss.api import Model
from jmoss.converters.convert import convert
from jmoss.engine import CpuBackend, HybridWeights, SegmentedModel, build_hybrid
from jmoss.jittor_setup import get_jittor
from jmoss.model import JittorOps
from jmoss.placement import Figures, plan_placement
from jmoss.store import Store
from test_engine import write_random_store

SHAPE = dict(n_embd=64, n_head=4, rotary_dim=8, n_layer=3, vocab_size=512, n_positions=64)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [1, 2, 3, 4]]  # batch 2, the second left-padded
CHUNK = 4  # prefill chunks of 4 tokens: 2 x 4 = 8 rows each, then 2 x 3, then decode rows of 2
THRESHOLD = 8  # rows: the first chunks take the large route, the last chunk and decode the small one


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hybrid")
    out = {"fp16": write_random_store(root / "fp16", SHAPE)}
    model = tiny_model(seed=5, n_layer=3)
    for bits in (4, 8):
        src, _ = save_gptq_checkpoint(model, root / f"src{bits}", bits, groupsize=32, seed=bits, config_wbits=bits)
        out[f"int{bits}"] = convert(str(src), root / f"int{bits}", progress=False)
    return out


# Speeds at which copying beats the CPU from 2 rows on: the planner then gives the plan slots, and
# the test moves the threshold to THRESHOLD (only routing changes; the slots are the plan's).
LINK_WINS = Figures(link_gbps=1000.0, cpu_gbps=1.0, cpu_gflops=0.001, device_gbps=1000.0)


def hybrid_plan(store: Store, n_device: int, head_on_device: bool, *, threshold: int | None = THRESHOLD,
                host_memory: int | None = None, kv_dtype: str = "float32"):
    """The planner's offload-cpu plan for this split (by default a float32 KV cache on the device
    side too, as the stand-in device computes in fp32). ``threshold``: rows from which chunks
    stream; None: the plan without slots, the CPU computes every chunk."""
    plan = plan_placement(store.config, device="cuda", device_memory=None, host_memory=host_memory, offload="cpu",
                          split=(n_device, head_on_device), kv_dtype=kv_dtype, prefill_chunk=CHUNK, max_seq_len=32,
                          batch=2, figures=LINK_WINS if threshold else None)
    if threshold is None:
        assert plan.cpu_min_rows is None and plan.prefetch_depth == 0 and not plan.slot_layouts
        return plan
    assert plan.cpu_min_rows == 2 and plan.prefetch_depth == 2
    return dataclasses.replace(plan, cpu_min_rows=threshold)


def load_hybrid(store_path: Path, plan, device=None) -> Model:
    """A Model over the segmented engine, the device stood in for by a CPU backend (or ``device``)."""
    jt = get_jittor("cpu")
    store = Store.open(store_path)
    config = store.config
    device = device or CpuBackend(jt, config, kv_dtype=plan.kv_dtype, name="device")
    weights, net = build_hybrid(store, plan, jt, "float16", device=device)
    return Model(config, {layout.EMBED: store.group(layout.EMBED)}, device="cpu", dtype="float16",
                 compute_dtype="float32", weights=weights, plan=plan, net=net, tokenizer_path=store.path)


def run(model, rows=PROMPTS, steps: int = 3) -> tuple[np.ndarray, list[list[int]]]:
    """Logits of the prefill's last position and of ``steps`` greedy decode steps, and the tokens."""
    session = model.session(batch=len(rows), max_len=32)
    logits = [session.prefill(rows)]
    tokens = [[int(t)] for t in np.argmax(logits[-1], axis=-1)]
    for _ in range(steps):
        logits.append(session.decode([t[-1] for t in tokens]))
        for t, nxt in zip(tokens, np.argmax(logits[-1], axis=-1)):
            t.append(int(nxt))
    return np.stack(logits), tokens


@pytest.fixture(scope="module")
def references(stores) -> dict[str, tuple[np.ndarray, list[list[int]]]]:
    """The single-backend CPU run of each store, chunked the same way."""
    return {kind: run(jmoss.load(path, device="cpu", prefill_chunk=CHUNK)) for kind, path in stores.items()}


def assert_same(got: tuple, want: tuple) -> None:
    logits, tokens = got
    scale = max(1.0, float(np.abs(want[0]).max()))
    assert float(np.abs(logits - want[0]).max()) <= 1e-5 * scale
    assert tokens == want[1]


SPLITS = [(n, head) for n in range(SHAPE["n_layer"] + 1) for head in (True, False) if (n, head) != (SHAPE["n_layer"], True)]


@pytest.mark.parametrize("n_device,head_on_device", SPLITS)
def test_a_split_at_every_layer_boundary_gives_the_single_backend_logits(stores, references, n_device, head_on_device):
    store = Store.open(stores["fp16"])
    plan = hybrid_plan(store, n_device, head_on_device)
    model = load_hybrid(stores["fp16"], plan)
    try:
        assert_same(run(model), references["fp16"])
        # 11 prompt tokens in chunks of 4 for 2 rows: 8 and 8 rows stream (large route), 6 rows and
        # the 3 decode steps (2 rows) compute the CPU's layers on the CPU (small route)
        stats = model.net.stats
        assert (stats.large_forwards, stats.small_forwards) == (2, 4)
        on_cpu = [g for g in layout.all_groups(store.config) if g in plan.groups_on("cpu")]
        assert model.weights.stats.groups_consumed == 2 * len(on_cpu)  # streamed in the large chunks only
    finally:
        model.weights.close()


@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("n_device,head_on_device", [(1, True), (2, False)])
def test_packed_stores_split_give_the_single_backend_logits(stores, references, kind, n_device, head_on_device):
    plan = hybrid_plan(Store.open(stores[kind]), n_device, head_on_device)
    model = load_hybrid(stores[kind], plan)
    try:
        assert_same(run(model), references[kind])
    finally:
        model.weights.close()


def test_without_slots_the_cpu_computes_every_chunk_and_the_numbers_hold(stores, references):
    plan = hybrid_plan(Store.open(stores["fp16"]), 1, True, threshold=None)
    model = load_hybrid(stores["fp16"], plan)
    try:
        assert_same(run(model), references["fp16"])
        assert (model.net.stats.large_forwards, model.net.stats.small_forwards) == (0, 6)
        assert model.weights.memory().get("staging_slots", 0) == plan.staging_bytes == 0
    finally:
        model.weights.close()


def _cache_bytes(cache, layers) -> int:
    return sum(int(cache.keys[i].nbytes) + int(cache.values[i].nbytes) for i in layers)


@pytest.mark.parametrize("short_host", [False, True])
def test_each_side_allocates_what_the_plan_bills(stores, references, short_host):
    store = Store.open(stores["fp16"])
    plan = hybrid_plan(store, 1, False)
    if short_host:  # the host holds the CPU side's KV cache, buffers, disk staging and one layer: the rest is paged
        plan = hybrid_plan(store, 0, False)
        fixed = plan.host_kv_bytes + plan.host_work_bytes + plan.handoff_host_bytes + 2 * plan.staging_slot_bytes
        plan = hybrid_plan(store, 0, False, host_memory=fixed + store.group_nbytes(0))
        assert plan.groups_on("cpu") == [0] and plan.groups_on("pages") == [1, 2, layout.HEAD]
        assert plan.host_staging_bytes == 2 * plan.staging_slot_bytes and plan.host_total_bytes <= plan.host_memory
    model = load_hybrid(stores["fp16"], plan)
    try:
        memory = model.weights.memory()
        assert memory["resident_weights"] == plan.resident_bytes
        assert memory["staging_slots"] == plan.staging_bytes
        # the stand-in device has no pinned copies to share: the CPU side reads its groups itself
        assert memory["host_weights_owned"] == plan.host_bytes and memory["host_weights_shared"] == 0
        assert memory["host_weights_mapped"] == plan.mapped_bytes
        session = model.session(batch=2, max_len=32)
        assert _cache_bytes(session.cache, plan.resident_layers) == plan.kv_bytes
        assert _cache_bytes(session.cache, plan.cpu_layers) == plan.host_kv_bytes
        assert session.cache.nbytes == plan.kv_bytes + plan.host_kv_bytes
        if short_host:
            assert_same(run(model), references["fp16"])
    finally:
        model.weights.close()


def test_the_routes_say_who_computes_what(stores):
    plan = hybrid_plan(Store.open(stores["fp16"]), 1, True)
    model = load_hybrid(stores["fp16"], plan)
    try:
        assert isinstance(model.net, SegmentedModel) and isinstance(model.weights, HybridWeights)
        assert model.net.describe().splitlines() == [
            "forwards under 8 rows: layer 0 on device -> layers 1-2 on cpu -> head on device",
            "forwards of 8+ rows: layer 0 on device -> layers 1-2 on device (attention on cpu) -> head on device",
        ]
    finally:
        model.weights.close()


def test_the_cuda_backend_hands_off_through_pinned_buffers_and_matches_its_stand_in(stores, monkeypatch):
    """CudaBackend + CudaStreamingWeights on test_cuda_engine.py's device stand-ins (CPU Jittor Vars
    as device memory, a runtime whose copies run only when waited for) against a CPU standing in
    for the device with the same math: plain Jittor ops, fp16 activations and KV cache."""
    from test_cuda_engine import DeviceJittor, fake_runtime

    from jmoss.engine import cuda as cuda_engine

    jt = get_jittor("cpu")
    device_jt = DeviceJittor(jt)
    runtime = fake_runtime(device_jt)
    monkeypatch.setattr(cuda_engine, "cuda_runtime", runtime)
    store = Store.open(stores["fp16"])
    plan = hybrid_plan(store, 1, True, kv_dtype="float16")
    config = store.config
    stand_in = CpuBackend(jt, config, ops=JittorOps(jt), compute_dtype="float16", kv_dtype="float16", name="device")
    want = run(load_hybrid(stores["fp16"], plan, device=stand_in))

    backend = cuda_engine.CudaBackend(device_jt, config, plan, compute_dtype="float16")
    weights, net = build_hybrid(store, plan, device_jt, "float16", device=backend)
    model = Model(config, {layout.EMBED: store.group(layout.EMBED)}, device="cpu", dtype="float16",
                  compute_dtype="float16", weights=weights, plan=plan, net=net)
    try:
        # device side: the resident layer and head, the two slots, the hand-off Var; host side: the
        # cpu-tier groups pinned once (and shared: the CPU computes from those very buffers) and the
        # pinned hand-off buffer; the bounce buffers of the load are gone
        assert device_jt.allocated == plan.resident_bytes + plan.staging_bytes + plan.handoff_device_bytes
        assert sum(n for n, _ in runtime.pinned.values()) == plan.host_bytes + plan.handoff_host_bytes
        memory = weights.memory()
        assert memory["pinned_host_weights"] == memory["host_weights_shared"] == plan.host_bytes
        assert memory["host_weights_owned"] == 0
        assert (memory["handoff_pinned"], memory["handoff_device"]) == (plan.handoff_host_bytes, plan.handoff_device_bytes)
        runtime.log.clear()
        got = run(model)
        np.testing.assert_array_equal(got[0], want[0])
        assert got[1] == want[1]
        # each hand-off (to the device, or from it) is one copy through the pinned hand-off buffer
        d2h = [e for e in runtime.log if e[0] == "copy_d2h"]
        h2d = [e for e in runtime.log if e[0] == "copy" and e[3] == backend._pinned.ptr]
        assert d2h and h2d and net.stats.handoffs == len(d2h) + len(h2d)
        assert all(e[2] == backend._pinned.ptr for e in d2h)
    finally:
        weights.close()
    assert not runtime.pinned, "close() frees every pinned buffer, the hand-off's included"


def _greedy(session, prompt: list[int], steps: int = 3) -> list[int]:
    tokens = [int(np.argmax(session.prefill([prompt])[0]))]
    for _ in range(steps):
        tokens.append(int(np.argmax(session.decode([tokens[-1]])[0])))
    return tokens


def test_continuous_batching_on_the_segmented_engine_gives_each_sequence_alone(stores):
    """serve --max-batch on offload cpu: the batch runner's steps (rows joining, padded, the cache
    repacked, made by the engine: each layer's where it attends) give each sequence's tokens alone."""
    import threading

    from jmoss.batching import BatchRunner

    reference = jmoss.load(stores["fp16"], device="cpu", prefill_chunk=CHUNK)
    alone = [_greedy(reference.session(max_len=32), p) for p in PROMPTS]
    model = load_hybrid(stores["fp16"], hybrid_plan(Store.open(stores["fp16"]), 1, False))
    runner = BatchRunner(model, 2, max_len=32, step_tokens=8)
    results: list = [None, None]

    def work(i: int) -> None:
        slot = runner.acquire()
        try:
            slot.reset()
            results[i] = _greedy(slot, PROMPTS[i])
        except BaseException as exc:  # surfaced below
            results[i] = exc
        finally:
            runner.release(slot)

    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        runner.stop()
        model.weights.close()
    assert results == alone
    assert model.net.stats.small_forwards > 0  # the steps ran through the segments


def test_lookup_verify_passes_on_the_segmented_engine_give_plain_greedy(stores):
    """Prompt-lookup decoding (jmoss.lookup) on offload cpu: a Session's verify pass and a batch
    step keeping a verify pass's last rows (``tail``) run through the segments and give plain
    greedy. The real engine's logits get a period-4 repetition forced on top (tests/forced_model.py),
    so drafts from the prompt are accepted."""
    from forced_model import forced
    from jmoss.batching import BatchRunner
    from jmoss.generation import GenerationOptions, generate_ids
    from jmoss.lookup import LookupStats

    model = load_hybrid(stores["fp16"], hybrid_plan(Store.open(stores["fp16"]), 1, False))
    forced(model, lambda history: history[-4])
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]
    stats = LookupStats()

    def greedy(target, lookup) -> list[int]:
        opts = GenerationOptions(do_sample=False, max_new_tokens=12, lookup=lookup, repetition_penalty=1.0, stop=())
        return [s[0] for s in generate_ids(model, target, [prompt], opts, stats=stats) if s[0] is not None]

    try:
        plain = greedy(model.session(max_len=32), "off")
        assert greedy(model.session(max_len=32), 4) == plain
        runner = BatchRunner(model, 2, max_len=32, step_tokens=8)
        try:
            slot = runner.acquire()
            slot.reset()
            assert greedy(slot, 4) == plain
            runner.release(slot)
        finally:
            runner.stop()
    finally:
        model.weights.close()
    assert plain == [8, 5, 6, 7] * 3 and stats.accepted > 0


def test_jmoss_load_plans_and_builds_offload_cpu_on_cuda(stores, monkeypatch):
    """jmoss.load(device="cuda", offload=...) end to end on the device stand-ins: the plan it makes,
    the engine it builds, and the same numbers as a CPU standing in for the device on that plan."""
    from test_cuda_engine import DeviceJittor, fake_runtime

    from jmoss import api
    from jmoss.engine import cuda as cuda_engine
    from jmoss.errors import DeviceError

    jt = get_jittor("cpu")
    device_jt = DeviceJittor(jt)
    runtime = fake_runtime(device_jt)
    monkeypatch.setattr(cuda_engine, "cuda_runtime", runtime)
    monkeypatch.setattr(api, "resolve_device", lambda device: "cuda")
    monkeypatch.setattr(api, "get_jittor", lambda device: device_jt)
    store = Store.open(stores["fp16"])
    # the budget of every layer on the CPU and the head on the device: no larger resident set fits it
    every_layer = plan_placement(store.config, device="cuda", device_memory=None, host_memory=None, offload="cpu",
                                 split=(0, True), max_seq_len=32, figures=LINK_WINS)
    model = jmoss.load(stores["fp16"], device="cuda", device_memory=every_layer.device_total_bytes, offload="cpu",
                       figures=LINK_WINS, max_seq_len=32)
    plan = model.plan
    try:
        assert plan.offload == "cpu" and plan.cpu_layers == [0, 1, 2] and plan.groups_on("device") == [layout.HEAD]
        assert isinstance(model.net, SegmentedModel) and plan.cpu_min_rows == 2
        got = [_greedy(model.session(max_len=32), p) for p in PROMPTS]
        assert (model.net.stats.large_forwards, model.net.stats.small_forwards) == (2, 6)  # prompts, then decode
    finally:
        model.weights.close()
    stand_in = CpuBackend(jt, store.config, ops=JittorOps(jt), compute_dtype="float16", kv_dtype="float16",
                          name="device")
    reference = load_hybrid(stores["fp16"], plan, device=stand_in)
    assert got == [_greedy(reference.session(max_len=32), p) for p in PROMPTS]
    with pytest.raises(DeviceError, match="offload must be one of"):
        jmoss.load(stores["fp16"], device="cuda", device_memory=every_layer.device_total_bytes, offload="gpu")


def test_offload_changes_nothing_on_the_cpu(stores, references):
    model = jmoss.load(stores["fp16"], device="cpu", prefill_chunk=CHUNK, offload="cpu")
    assert not model.plan.hybrid and any("offload applies to cuda" in n for n in model.plan.notes)
    assert_same(run(model), references["fp16"])


def test_auto_measures_its_figures_once_per_process_and_chooses_by_them(stores, monkeypatch):
    from test_cuda_engine import DeviceJittor, fake_runtime

    from jmoss import api, cuda_runtime
    from jmoss.engine import cuda as cuda_engine
    from jmoss.engine import factory

    jt = get_jittor("cpu")
    device_jt = DeviceJittor(jt)
    monkeypatch.setattr(cuda_engine, "cuda_runtime", fake_runtime(device_jt))
    monkeypatch.setattr(api, "resolve_device", lambda device: "cuda")
    monkeypatch.setattr(api, "get_jittor", lambda device: device_jt)
    calls: list[str] = []
    # a link far slower than this CPU's kernels: offload cpu must win
    monkeypatch.setattr(cuda_runtime, "pinned_h2d_gbps", lambda: calls.append("link") or {"gbps": 0.001})
    monkeypatch.setattr(cuda_runtime, "device_gbps", lambda: calls.append("device") or {"gbps": 1000.0})
    rates = factory.kernel_rates
    monkeypatch.setattr(factory, "kernel_rates",
                        lambda jt, config: calls.append("cpu") or rates(jt, config, nbytes=4 << 20, repeats=1))
    monkeypatch.setattr(factory, "_measured", {})
    store = Store.open(stores["fp16"])
    budget = plan_placement(store.config, device="cuda", device_memory=None, host_memory=None, offload="cpu",
                            split=(1, True), max_seq_len=32).device_total_bytes
    for _ in range(2):
        model = jmoss.load(stores["fp16"], device="cuda", device_memory=budget, max_seq_len=32)
        model.weights.close()
    assert calls == ["link", "device", "cpu"]  # the second load reused them
    plan = model.plan
    assert plan.figures.source == "measured at load" and plan.figures.cpu_gbps > 0
    assert plan.offload == "cpu" and plan.predicted_tok_s["cpu"] > plan.predicted_tok_s["stream"]
    assert "computing them on the CPU predicts" in plan.reason


@pytest.mark.parametrize("kind", ["fp16", "int4", "int8"])
def test_the_cpu_probe_runs_the_kernels_on_the_stores_format(stores, kind):
    from jmoss.engine.cpu import kernel_rates

    config = Store.open(stores[kind]).config
    rates = kernel_rates(get_jittor("cpu"), config, nbytes=2 << 20, repeats=1, gemm_rows=8)
    assert rates["gbps"] > 0 and rates["gflops"] > 0
    assert ("fp16" if kind == "fp16" else kind) in rates["what"]
