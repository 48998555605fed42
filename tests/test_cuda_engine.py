"""The CUDA backend's host side, proven on a CPU: what it asks the CUDA runtime and Jittor to do.

No GPU here, so two stand-ins replace what only a device has, and everything else is real:

- ``jt``: real CPU Jittor, where ``jt.empty`` Vars play device memory; the engine's one CUDA op
  (``_device_ptr``) is answered by the same op in CPU code, so the addresses it copies to are
  real Jittor buffers that the model then computes with;
- ``cuda_runtime``: pinned buffers, streams and events that log every call, with copies
  *deferred* like a real stream's: queued, and executed only when an event recorded behind them
  (or the stream) is synchronized. A missing wait, or a bounce buffer refilled before its copies
  ran, therefore yields wrong weights and wrong logits, not just a wrong log.

Logits are compared with the plain CPU path (same Jittor ops, fp16 weights and activations).
"""

from __future__ import annotations

import ast
import ctypes
import dataclasses
import sys
import tracemalloc
import types
from pathlib import Path

import numpy as np
import pytest

from jmoss import layout
from jmoss.config import MossConfig
from jmoss.engine import cuda as cuda_engine
from jmoss.store import GroupWriter, Store, finalize_store

SHAPE = dict(vocab_size=1024, n_positions=64, n_embd=128, n_layer=4, n_head=4, rotary_dim=16)
PROMPT = [5, 17, 300, 2, 999, 64]
TOTAL_DEVICE = 80 << 30
BOUNCE = 60_000  # not a divisor of any tensor: chunks straddle tensor boundaries
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    config = MossConfig.from_dict({**SHAPE, "model_type": "moss", "eos_token_id": None})
    out = tmp_path_factory.mktemp("cuda-engine-store")
    rng = np.random.default_rng(3)
    records = {}
    for group in layout.all_groups(config):
        writer = GroupWriter(out, config, group)
        for name, shape in writer.shapes.items():
            noise = rng.standard_normal(shape, dtype=np.float32)
            writer.write_tensor(name, (1 + 0.05 * noise if name.startswith(("ln_1.w", "ln_f.w")) else 0.05 * noise)
                                .astype(np.float16))
        records[group] = writer.finish()
    return finalize_store(out, config, records)


class DeviceJittor(types.ModuleType):
    """Real CPU Jittor whose ``jt.empty`` Vars stand for device memory (see the module docstring)."""

    def __init__(self, jt) -> None:
        super().__init__("device_jittor")
        self._jt = jt
        self.allocated = 0
        self.ranges: list[tuple[int, int]] = []  # (address, nbytes) of every Var whose address was taken
        self.loading = False

    def __getattr__(self, name):
        return getattr(self._jt, name)

    def empty(self, shape, dtype):
        var = self._jt.empty(shape, dtype)
        self.allocated += int(np.prod(shape)) * np.dtype(str(dtype)).itemsize
        return var

    def code(self, shape, dtype, inputs, cuda_src=None, **kwargs):
        assert cuda_src == cuda_engine._PTR_SRC and not kwargs, "the engine's only CUDA op is _device_ptr"
        out = self._jt.code(shape, dtype, inputs, cpu_src="out0_p[0] = (int64)in0_p;")
        var = inputs[0]
        self.ranges.append((int(out.numpy()[0]), int(var.numel()) * np.dtype(str(var.dtype)).itemsize))
        return out

    def array(self, *args, **kwargs):
        if self.loading:
            raise AssertionError("jt.array while loading: a host copy of a weight")
        return self._jt.array(*args, **kwargs)


def fake_runtime(jt: DeviceJittor):
    """A cuda_runtime stand-in: logs calls; stream copies run only when waited for."""
    log: list[tuple] = []
    pinned: dict[int, tuple[int, "PinnedBuffer"]] = {}  # live pinned buffers
    pins: list[tuple[int, int]] = []  # every one ever made

    def inside(ranges, ptr, n) -> bool:
        return any(a <= ptr and ptr + n <= a + size for a, size in ranges)

    class PinnedBuffer:
        def __init__(self, nbytes: int) -> None:
            self.array = np.zeros(max(1, nbytes), np.uint8)[:nbytes]
            self.ptr, self.nbytes = self.array.ctypes.data, nbytes
            pinned[self.ptr] = (nbytes, self)
            pins.append((self.ptr, nbytes))
            log.append(("pin", nbytes))

        def close(self) -> None:
            pinned.pop(self.ptr, None)
            log.append(("unpin", self.nbytes))

    class Stream:
        count = 0

        def __init__(self) -> None:
            Stream.count += 1
            self.id, self.queue, self.done = Stream.count, [], 0
            log.append(("stream", self.id))

        def copy_h2d(self, device_ptr: int, host_ptr: int, nbytes: int) -> None:
            assert inside(jt.ranges, device_ptr, nbytes), "copy to an address that is no device Var's"
            assert inside([(p, n) for p, (n, _) in pinned.items()], host_ptr, nbytes), "copy from non-pinned memory"
            self.queue.append((device_ptr, host_ptr, nbytes))
            log.append(("copy", self.id, device_ptr, host_ptr, nbytes))

        def copy_d2h(self, host_ptr: int, device_ptr: int, nbytes: int) -> None:
            assert inside(jt.ranges, device_ptr, nbytes), "copy from an address that is no device Var's"
            assert inside([(p, n) for p, (n, _) in pinned.items()], host_ptr, nbytes), "copy into non-pinned memory"
            self.queue.append((host_ptr, device_ptr, nbytes))
            log.append(("copy_d2h", self.id, host_ptr, device_ptr, nbytes))

        def run_until(self, mark: int) -> None:
            while self.done < mark:
                dst, src, n = self.queue[self.done]
                live = [(p, size) for p, (size, _) in pinned.items()]
                assert inside(live, src, n) or inside(live, dst, n), "pinned buffer freed before its copy"
                ctypes.memmove(dst, src, n)
                self.done += 1

        def synchronize(self) -> None:
            self.run_until(len(self.queue))
            log.append(("stream_sync", self.id))

        def close(self) -> None:
            log.append(("stream_close", self.id))

    class Event:
        count = 0

        def __init__(self, timing: bool = False) -> None:
            Event.count += 1
            self.id, self.stream, self.mark = Event.count, None, 0
            log.append(("event", self.id))

        def record(self, stream: Stream) -> None:
            self.stream, self.mark = stream, len(stream.queue)
            log.append(("record", self.id, stream.id))

        def synchronize(self) -> None:
            if self.stream is not None:
                self.stream.run_until(self.mark)
            log.append(("wait", self.id))

        def close(self) -> None:
            log.append(("event_close", self.id))

    def mem_info() -> tuple[int, int]:
        return TOTAL_DEVICE - jt.allocated, TOTAL_DEVICE

    def pinned_h2d_gbps(nbytes: int = 256 << 20, repeats: int = 5) -> dict:
        log.append(("probe", nbytes, repeats))
        return {"what": "fake", "gbps": 1.0, "bytes": nbytes}

    return types.SimpleNamespace(PinnedBuffer=PinnedBuffer, Stream=Stream, Event=Event, mem_info=mem_info,
                                 pinned_h2d_gbps=pinned_h2d_gbps, log=log, pinned=pinned, pins=pins)


@pytest.fixture
def device(monkeypatch):
    """(DeviceJittor, fake runtime), wired into the CUDA engine and jmoss.load; cupy made unimportable."""
    from jmoss import api
    from jmoss.jittor_setup import get_jittor

    monkeypatch.setitem(sys.modules, "cupy", None)  # any `import cupy` now raises ImportError
    jt = DeviceJittor(get_jittor("cpu"))
    runtime = fake_runtime(jt)
    monkeypatch.setattr(cuda_engine, "cuda_runtime", runtime)
    monkeypatch.setattr(cuda_engine, "BOUNCE_BYTES", BOUNCE)
    monkeypatch.setattr(api, "resolve_device", lambda device: "cuda")
    monkeypatch.setattr(api, "get_jittor", lambda device: jt)

    def warm_up(model):  # jmoss.load's kernel warm-up is a forward (activations), not weight loading
        loading, jt.loading = jt.loading, False
        try:
            return real_warm_up(model)
        finally:
            jt.loading = loading

    real_warm_up = api.warm_up
    monkeypatch.setattr(api, "warm_up", warm_up)
    return jt, runtime


def greedy(model, n: int = 4) -> tuple[np.ndarray, list[int]]:
    session = model.session(max_len=len(PROMPT) + n)
    logits = session.prefill([PROMPT])
    first = logits[0, -1].astype(np.float32)
    out = [int(np.argmax(first))]
    for _ in range(n - 1):
        out.append(int(np.argmax(session.decode([out[-1]])[0, -1])))
    return first, out


@pytest.fixture(scope="module")
def reference(store_path):
    """Logits and greedy tokens of the plain CPU path with the same ops (fp16 weights and activations)."""
    import jmoss

    return greedy(jmoss.load(store_path, device="cpu", dtype="float16", compute_dtype="float16"))


def test_no_jmoss_module_imports_cupy():
    found = []
    for path in (ROOT / "jmoss").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "cupy"]
    assert not found
    assert "cupy" not in (ROOT / "setup.py").read_text()


def test_all_resident_load_copies_the_store_into_device_vars_through_bounded_pinned_buffers(device, store_path, reference):
    import jmoss

    jt, runtime = device
    jt.loading = True
    model = jmoss.load(store_path, device="cuda")
    jt.loading = False
    weights = model.weights
    assert isinstance(weights, cuda_engine.CudaResidentWeights)

    store = Store.open(store_path)
    # Host allocations while the weights are built stay far below the weights: no host array of them.
    # (Store.open is left out: it reads small files through a 256 MiB read buffer of its own.)
    tracemalloc.start()
    cuda_engine.CudaResidentWeights(store, jt)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    runtime.log.clear()
    model.weights = weights = cuda_engine.CudaResidentWeights(Store.open(store_path), jt)  # a fresh log of one load
    groups = [*range(SHAPE["n_layer"]), layout.HEAD]
    resident = sum(store.group_nbytes(g) for g in groups)
    # Each weight is in its device Var, byte for byte, and nowhere else on the host: the only
    # pinned memory ever taken is the two bounce buffers, freed at the end of the load.
    for g, vars_ in zip(groups, [weights.layer(i) for i in range(SHAPE["n_layer"])] + [weights.head()]):
        for name, array in store.group(g).items():
            np.testing.assert_array_equal(vars_[name].numpy(), array)
    assert [e for e in runtime.log if e[0] == "pin"] == [("pin", BOUNCE)] * 2 and not runtime.pinned
    copies = [e for e in runtime.log if e[0] == "copy"]
    assert sum(e[4] for e in copies) == resident
    assert max(e[4] for e in copies) <= BOUNCE
    assert peak < 2 * BOUNCE + resident // 4, (peak, resident)
    # The allocator's own figures (cudaMemGetInfo) bracket the load.
    m = weights.load_memory
    assert m["resident_bytes_copied"] == resident
    assert m["device_bytes_added_by_load"] == m["device_free_before_load"] - m["device_free_after_load"] >= resident
    assert m["device_total"] == TOTAL_DEVICE
    # The numbers the model computes from them are the CPU path's.
    logits, tokens = greedy(model)
    np.testing.assert_array_equal(logits, reference[0])
    assert tokens == reference[1]


def refill_violations(log: list[tuple], pins: list[tuple[int, int]]) -> list[str]:
    """Copies out of a bounce buffer whose previous copies were not waited for (event or stream sync)."""
    def buffer(ptr: int) -> int:
        return next(i for i, (p, n) in enumerate(pins) if p <= ptr < p + n)

    clear: dict[int, bool] = {}
    event_of: dict[int, int] = {}
    filling, problems = None, []
    for entry in log:
        if entry[0] == "copy":
            b = buffer(entry[3])
            if filling != b:
                if not clear.get(b, True):
                    problems.append(f"buffer {b} refilled before its copies were waited for")
                filling = b
        elif entry[0] == "record":
            assert event_of.setdefault(filling, entry[1]) == entry[1], "one event per bounce buffer"
            clear[filling], filling = False, None
        elif entry[0] == "wait":
            clear.update({b: True for b, ev in event_of.items() if ev == entry[1]})
        elif entry[0] == "stream_sync":
            clear = {b: True for b in clear}
    return problems


def test_bounce_buffer_is_refilled_only_after_waiting_for_its_copies(device, store_path):
    jt, runtime = device
    cuda_engine.CudaResidentWeights(Store.open(store_path), jt)
    pins = runtime.pins
    assert len(pins) == 2
    chunks = [e for e in runtime.log if e[0] == "record"]
    assert len(chunks) > 8 and len({e[1] for e in chunks}) == 2  # many chunks, alternating two buffers
    assert refill_violations(runtime.log, pins) == []
    # the check itself catches a loader that does not wait
    no_waits = [e for e in runtime.log if e[0] not in ("wait", "stream_sync")]
    assert refill_violations(no_waits, pins)


def _plan(store: Store, tiers: dict) -> object:
    from jmoss.placement import plan_placement, slot_allocation

    plan = plan_placement(store.config, device="cuda", device_memory=None, host_memory=None, max_seq_len=32)
    placements = tuple(dataclasses.replace(p, where=tiers.get(p.group, p.where)) for p in plan.placements)
    slot = max(store.group_nbytes(g) for g, where in tiers.items() if where == "disk")
    streamed = [g for g, where in tiers.items() if where != "device"]
    layouts = slot_allocation("cuda", streamed, {g: store.group_nbytes(g) for g in streamed})
    return dataclasses.replace(plan, placements=placements, staging_slot_bytes=slot, prefetch_depth=2,
                               slot_layouts=layouts)


def test_streaming_engine_copies_then_records_then_waits_and_matches_the_cpu_path(device, store_path, reference):
    from jmoss.api import Model

    jt, runtime = device
    store = Store.open(store_path)
    tiers = {0: "device", 1: "host", 2: "disk", 3: "disk", layout.HEAD: "device"}
    jt.loading = True
    weights = cuda_engine.CudaStreamingWeights(store, _plan(store, tiers), jt)
    jt.loading = False
    try:
        # Resident groups went through the bounce buffers; host-tier pinned once; two staging slots.
        resident = store.group_nbytes(0) + store.group_nbytes(layout.HEAD)
        assert weights.load_memory["resident_bytes_copied"] == resident
        assert weights.memory()["pinned_host_weights"] == store.group_nbytes(1)
        assert weights.memory()["pinned_staging"] == 2 * store.group_nbytes(2)
        model = Model(store.config, {layout.EMBED: store.group(layout.EMBED)}, device="cuda", weights=weights)
        logits, tokens = greedy(model)
        np.testing.assert_array_equal(logits, reference[0])
        assert tokens == reference[1]
        # Per fill, on the engine's own stream: the group's copies, then one record of the slot's
        # event, then a wait on that event before the next fill starts (the slot is handed out after).
        weights._halt()  # the reader is prefetching the next token's groups: let it finish that fill
        stream = weights._stream
        event_ids = [e.id for e in weights._events]
        start = max(i for i, e in enumerate(runtime.log) if e[0] == "event" and e[1] in event_ids) + 1
        fills = runtime.log[start:]  # the reader starts right after the engine's events are made
        copies_per_group = len(store.tensor_offsets(1))
        k = 0
        n_fills = 0
        while k < len(fills):
            if fills[k][0] != "copy":
                k += 1
                continue
            run = fills[k : k + copies_per_group]
            assert all(e[0] == "copy" and e[1] == stream.id for e in run), run
            record, wait = fills[k + copies_per_group], fills[k + copies_per_group + 1]
            slot_event = event_ids[n_fills % 2]
            assert record == ("record", slot_event, stream.id) and wait == ("wait", slot_event), (record, wait)
            n_fills += 1
            k += copies_per_group + 2
        assert n_fills >= 3 * 4  # three streamed groups, four forwards
    finally:
        weights.close()
    assert not runtime.pinned, "close() frees every pinned buffer"
    assert ("stream_close", stream.id) in runtime.log and all(("event_close", i) in runtime.log for i in event_ids)


def test_pinned_bound_is_the_runtime_probe(device):
    _, runtime = device
    assert cuda_engine.pinned_h2d_bound(1 << 20, 2)["gbps"] == 1.0
    assert ("probe", 1 << 20, 2) in runtime.log


def test_gpu_record_reports_what_the_allocator_saw_the_load_take(device, store_path, monkeypatch):
    from jmoss import cuda_runtime

    jt, runtime = device
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_record

    monkeypatch.setattr(cuda_runtime, "mem_info", runtime.mem_info)  # the record's own cudaMemGetInfo
    run = gpu_record.run_budget(store_path, "cuda", None, 3)
    store = Store.open(store_path)
    resident = sum(store.group_nbytes(g) for g in [*range(SHAPE["n_layer"]), layout.HEAD])
    memory = run["engine_load_memory"]
    assert memory["resident_bytes_copied"] == resident and run["resident_on_device_at_load"] is True
    assert run["memory_added_by_load"] >= memory["device_bytes_added_by_load"] >= resident
    result = {"device": "cuda", "store_bytes": resident, "store_write_seconds": 0.0, "runs": [run],
              "probe": runtime.pinned_h2d_gbps(), "greedy_tokens_equal": True, "jittor_swap": {}}
    text = gpu_record.as_text(result)
    assert f"resident {resident / 2**20:.1f} MiB copied to device at load" in text and "on device at load: True" in text
