"""The placement plan, checked against the real MOSS-16B config and arithmetic done by hand.

The hand computation below is written from the tensor shapes, not from the planner's helpers,
so a mistake in either shows up as a mismatch.
"""

from __future__ import annotations

import json

import pytest

from conftest import SHARED

from jmoss.config import MossConfig
from jmoss.errors import BudgetError, ContextLengthError, DeviceError
from jmoss.placement import RUNTIME_RESERVE, plan_placement, slot_allocation
from jmoss.sizes import GiB, MiB

MOSS_CONFIG = SHARED / "assets" / "moss-moon-003-sft" / "config.json"

# ---- MOSS-16B by hand (fp16 weights) ---------------------------------------------------------
D, INNER, VOCAB, N_LAYER, HEADS, POSITIONS, ROTARY = 6144, 4 * 6144, 107008, 34, 24, 2048, 64
LAYER_BYTES = 2 * (
    2 * D  # ln_1 weight + bias
    + 3 * D * D  # fused qkv
    + D * D  # out_proj
    + INNER * D + INNER  # fc_in weight + bias
    + D * INNER + D  # fc_out weight + bias
)
HEAD_BYTES = 2 * (2 * D + VOCAB * D + VOCAB)  # ln_f + lm_head with bias
EMBED_ROW = 2 * D  # one fp16 row of wte per decode token
KV_CUDA = 2 * N_LAYER * POSITIONS * D * 2  # keys + values, fp16, batch 1
KV_CPU = 2 * N_LAYER * POSITIONS * D * 4  # fp32 on cpu
CHUNK = 512  # default prefill chunk
WORK_CUDA = (
    6 * CHUNK * D * 2  # hidden states (fp16)
    + CHUNK * 3 * D * 2  # qkv
    + 2 * CHUNK * D * 4  # q, k in fp32
    + 2 * HEADS * CHUNK * POSITIONS * 4  # scores + probs, fp32
    + 2 * CHUNK * INNER * 2  # fc_in out + gelu out
    + 2 * VOCAB * 4  # logits + probs for the last position
    + 2 * POSITIONS * ROTARY * 4  # sin/cos
)
RESERVE_CUDA = 256 * MiB
FIXED_CUDA = KV_CUDA + WORK_CUDA + RESERVE_CUDA


def test_hand_numbers_agree_with_anchors():
    # anchors §4.4: 453.0M params per layer, lm_head 657.6M with bias, 835.6 KB of KV per token
    assert LAYER_BYTES == 906_055_680
    assert HEAD_BYTES == 1_315_152_896
    assert KV_CUDA // POSITIONS == 835_584


def hand_resident_layers(budget: int) -> int:
    """Head resident + 2 staging slots of one layer; the rest of the budget holds whole layers."""
    room = budget - FIXED_CUDA - HEAD_BYTES - 2 * LAYER_BYTES
    return min(N_LAYER, room // LAYER_BYTES)


@pytest.fixture(scope="module")
def moss() -> MossConfig:
    return MossConfig.from_json_file(MOSS_CONFIG)


# Resident layers at each budget, from hand_resident_layers (and what a reader can check by eye:
# 8 GiB leaves ~2.9 GiB after KV, buffers, reserve, staging and head = 3 layers of 0.84 GiB).
EXPECTED_LAYERS = {8: 3, 12: 8, 16: 12, 20: 17, 24: 22}


@pytest.mark.parametrize("gib", [8, 12, 16, 20, 24])
def test_moss_cuda_plan_fits_and_streams_the_hand_computed_bytes(moss, gib):
    budget = gib * GiB
    plan = plan_placement(moss, device="cuda", device_memory=budget, host_memory=64 * GiB)

    n = hand_resident_layers(budget)
    assert n == EXPECTED_LAYERS[gib]
    assert plan.resident_layers == list(range(n))  # the first layers, one contiguous run
    assert plan.groups_on("device") == [*range(n), "head"]
    assert plan.prefetch_depth == 2 and plan.staging_slot_bytes == LAYER_BYTES

    assert plan.kv_bytes == KV_CUDA
    assert plan.work_bytes == WORK_CUDA
    assert plan.resident_bytes == n * LAYER_BYTES + HEAD_BYTES
    expected_total = n * LAYER_BYTES + HEAD_BYTES + FIXED_CUDA + 2 * LAYER_BYTES
    assert plan.device_total_bytes == expected_total <= budget
    # not wasteful: one more layer would not have fitted
    assert expected_total + LAYER_BYTES > budget

    streamed = (N_LAYER - n) * LAYER_BYTES + EMBED_ROW
    assert plan.streamed_bytes_per_token == streamed
    assert plan.host_bytes == (N_LAYER - n) * LAYER_BYTES  # host_memory is large: nothing from disk
    assert plan.disk_bytes_per_token == 0 and plan.host_staging_bytes == 0


def test_moss_cuda_streamed_gigabytes_per_budget(moss):
    # The table the issue asks for, in decimal GB per token (PCIe speeds are decimal GB/s).
    got = {
        gib: round(plan_placement(moss, device="cuda", device_memory=gib * GiB, host_memory=64 * GiB)
                   .streamed_bytes_per_token / 1e9, 2)
        for gib in EXPECTED_LAYERS
    }
    assert got == {8: 28.09, 12: 23.56, 16: 19.93, 20: 15.40, 24: 10.87}


@pytest.mark.parametrize("gib", [6, 8, 12, 16, 20, 24, 30, 34])
def test_moss_plan_is_optimal_among_all_resident_sets(moss, gib):
    # Brute force over head in/out and any number of resident layers, with 2 staging slots each
    # holding what the CUDA engine allocates (a layer Var set if layers stream, plus a head set if
    # the head streams): nothing that fits keeps more bytes resident.
    budget = gib * GiB
    plan = plan_placement(moss, device="cuda", device_memory=budget, host_memory=64 * GiB)
    best = 0
    for head in (True, False):
        for n in range(N_LAYER + 1):
            streamed = [LAYER_BYTES] * (N_LAYER - n) + ([] if head else [HEAD_BYTES])
            resident = n * LAYER_BYTES + (HEAD_BYTES if head else 0)
            staging = 2 * ((LAYER_BYTES if n < N_LAYER else 0) + (0 if head else HEAD_BYTES))
            if resident + FIXED_CUDA + staging <= budget:
                best = max(best, resident)
    assert plan.resident_bytes == best


def test_none_budget_with_enough_memory_keeps_everything_resident(moss):
    plan = plan_placement(moss, device="cuda", device_memory=None, host_memory=None,
                          available_device_bytes=40 * GiB)
    assert plan.resident_layers == list(range(N_LAYER))
    assert "head" in plan.groups_on("device")
    assert plan.staging_bytes == 0 and plan.prefetch_depth == 0
    assert plan.host_bytes == 0 and plan.disk_bytes_per_token == 0
    # no weights move; only the embedding row gathered on the host
    assert plan.streamed_bytes_per_token == EMBED_ROW
    assert plan.device_total_bytes == N_LAYER * LAYER_BYTES + HEAD_BYTES + FIXED_CUDA <= 40 * GiB


def test_none_budget_with_too_little_memory_says_what_is_needed(moss):
    with pytest.raises(BudgetError) as info:
        plan_placement(moss, device="cuda", device_memory=None, host_memory=None,
                       available_device_bytes=20 * GiB)
    message = str(info.value)
    need = N_LAYER * LAYER_BYTES + HEAD_BYTES + FIXED_CUDA
    assert f"{need / GiB:.1f} GiB" in message
    assert "20.0 GiB is available" in message
    assert "device_memory=" in message  # says what to do


def test_none_budget_without_a_measurement_is_all_resident_and_says_so(moss):
    plan = plan_placement(moss, device="cuda", device_memory=None, host_memory=None)
    assert len(plan.resident_layers) == N_LAYER
    assert any("not checked" in n for n in plan.notes)


def test_budget_below_minimum_fails_early_with_the_minimum(moss):
    # Cheapest possible plan: one slot. On cuda a slot holds a Var set per layout it streams, so
    # streaming the head costs a layer set + a head set per slot: the head resident + one layer
    # slot costs the same and keeps more resident.
    minimum = FIXED_CUDA + HEAD_BYTES + LAYER_BYTES
    with pytest.raises(BudgetError) as info:
        plan_placement(moss, device="cuda", device_memory=2 * GiB, host_memory=64 * GiB, offload="stream")
    message = str(info.value)
    assert f"{minimum / GiB:.2f} GiB" in message  # 4.22 GiB
    assert "KV cache" in message and "staging slot" in message
    assert "a shorter context with -c/--ctx-size (max_seq_len=)" in message and "prefetch_depth" not in message
    plan = plan_placement(moss, device="cuda", device_memory=minimum, host_memory=64 * GiB, offload="stream")
    assert plan.minimum_device_bytes == minimum
    with pytest.raises(BudgetError):
        plan_placement(moss, device="cuda", device_memory=minimum - 1, host_memory=64 * GiB, offload="stream")
    # offload auto (the default) computes what does not fit on the CPU instead, and says why
    plan = plan_placement(moss, device="cuda", device_memory=2 * GiB, host_memory=64 * GiB)
    assert plan.offload == "cpu" and plan.hybrid and "below streaming's minimum" in plan.reason
    assert plan.device_total_bytes <= 2 * GiB


def test_budget_for_one_slot_but_not_two_degrades_prefetch_depth_and_notes_it(moss):
    budget = FIXED_CUDA + HEAD_BYTES + LAYER_BYTES + 100 * MiB  # head + one layer slot fits, two slots do not
    plan = plan_placement(moss, device="cuda", device_memory=budget, host_memory=64 * GiB)
    assert plan.prefetch_depth == 1
    assert plan.staging_slot_bytes == LAYER_BYTES and plan.slot_layouts == {"layer": LAYER_BYTES}
    assert plan.groups_on("device") == ["head"]
    assert plan.streamed_bytes_per_token == N_LAYER * LAYER_BYTES + EMBED_ROW
    assert any("only 1 staging slot" in n for n in plan.notes)
    assert plan.device_total_bytes <= budget


def test_device_budget_above_free_memory_is_rejected(moss):
    with pytest.raises(BudgetError, match="more than the 10.0 GiB free"):
        plan_placement(moss, device="cuda", device_memory=12 * GiB, host_memory=None,
                       available_device_bytes=10 * GiB)


def test_small_host_memory_sends_the_last_layers_to_disk(moss):
    host = 10 * GiB
    plan = plan_placement(moss, device="cuda", device_memory=12 * GiB, host_memory=host)
    n = EXPECTED_LAYERS[12]
    host_staging = 2 * LAYER_BYTES  # pinned buffers disk reads land in
    n_host = (host - host_staging) // LAYER_BYTES
    assert plan.groups_on("host") == ["embed", *range(n, n + n_host)]
    assert plan.groups_on("disk") == list(range(n + n_host, N_LAYER))
    assert plan.host_staging_bytes == host_staging
    assert plan.host_total_bytes <= host
    assert plan.disk_bytes_per_token == (N_LAYER - n - n_host) * LAYER_BYTES
    # disk layers still cross PCIe: the bytes per token do not change with the host budget
    assert plan.streamed_bytes_per_token == (N_LAYER - n) * LAYER_BYTES + EMBED_ROW
    assert any("read from disk every token" in note for note in plan.notes)


def test_host_memory_too_small_for_disk_staging_fails_with_the_minimum(moss):
    with pytest.raises(BudgetError) as info:
        plan_placement(moss, device="cuda", device_memory=12 * GiB, host_memory=0)
    assert "staging" in str(info.value) and "host_memory=" in str(info.value)


def test_host_budget_above_free_ram_is_rejected(moss):
    with pytest.raises(BudgetError, match="free host RAM"):
        plan_placement(moss, device="cuda", device_memory=12 * GiB, host_memory=64 * GiB,
                       available_host_bytes=32 * GiB)


@pytest.mark.parametrize("gib", [8, 12, 16])
def test_moss_cpu_plans_stream_from_disk_within_the_ram_budget(moss, gib):
    budget = gib * GiB
    plan = plan_placement(moss, device="cpu", device_memory=budget, host_memory=None)
    assert plan.kv_bytes == KV_CPU and plan.kv_dtype == "float32"
    assert plan.reserve_bytes == RUNTIME_RESERVE["cpu"]
    fixed = KV_CPU + plan.work_bytes + RUNTIME_RESERVE["cpu"]
    n = min(N_LAYER, (budget - fixed - HEAD_BYTES - 2 * LAYER_BYTES) // LAYER_BYTES)
    assert plan.resident_layers == list(range(n))
    assert plan.groups_on("host") == ["embed"]  # no pinned-host tier on cpu
    assert plan.groups_on("disk") == list(range(n, N_LAYER))
    assert plan.disk_bytes_per_token == (N_LAYER - n) * LAYER_BYTES
    assert plan.streamed_bytes_per_token == (N_LAYER - n) * LAYER_BYTES + EMBED_ROW
    assert plan.device_total_bytes <= budget


def test_moss_cpu_at_6gib_keeps_the_head_with_a_single_staging_slot(moss):
    # The fp32 KV cache (3.2 GiB) leaves no room for head + two layer slots, nor for two
    # head-sized slots; one slot fits beside the resident head, which beats streaming everything.
    budget = 6 * GiB
    plan = plan_placement(moss, device="cpu", device_memory=budget, host_memory=None)
    fixed = KV_CPU + plan.work_bytes + RUNTIME_RESERVE["cpu"]
    assert fixed + HEAD_BYTES + 2 * LAYER_BYTES > budget and fixed + 2 * HEAD_BYTES > budget
    assert plan.groups_on("device") == ["head"]
    assert plan.prefetch_depth == 1 and plan.staging_slot_bytes == LAYER_BYTES
    assert plan.device_total_bytes == fixed + HEAD_BYTES + LAYER_BYTES <= budget
    assert plan.streamed_bytes_per_token == N_LAYER * LAYER_BYTES + EMBED_ROW
    assert any("only 1 staging slot" in n for n in plan.notes)


def test_cpu_ignores_host_memory_and_says_so(moss):
    plan = plan_placement(moss, device="cpu", device_memory=8 * GiB, host_memory=32 * GiB)
    assert plan.host_bytes == 0
    assert any("host_memory is not used on cpu" in n for n in plan.notes)


def test_shorter_context_frees_memory_for_more_resident_layers(moss):
    full = plan_placement(moss, device="cuda", device_memory=12 * GiB, host_memory=64 * GiB)
    short = plan_placement(moss, device="cuda", device_memory=12 * GiB, host_memory=64 * GiB, max_seq_len=512)
    assert short.kv_bytes == KV_CUDA // 4
    assert len(short.resident_layers) > len(full.resident_layers)


def test_plans_are_deterministic_and_serialise_to_json(moss):
    kwargs = dict(device="cuda", device_memory=16 * GiB, host_memory=20 * GiB)
    a, b = plan_placement(moss, **kwargs), plan_placement(moss, **kwargs)
    assert a == b
    assert a.describe(link_gbps=25) == b.describe(link_gbps=25)
    data = json.loads(json.dumps(a.to_dict()))
    assert data == b.to_dict()
    assert data["streamed_bytes_per_token"] == a.streamed_bytes_per_token
    assert [p["group"] for p in data["placements"]] == ["embed", *map(str, range(N_LAYER)), "head"]


def test_describe_shows_tiers_as_runs_and_the_per_token_cost(moss):
    plan = plan_placement(moss, device="cuda", device_memory=12 * GiB, host_memory=10 * GiB)
    text = plan.describe(link_gbps=25, disk_gbps=3.5)
    lines = text.splitlines()
    assert any(line.split()[:3] == ["layers", "0-7", "device"] for line in lines)
    assert any(line.split()[:3] == ["layers", "8-16", "host"] for line in lines)
    assert any(line.split()[:3] == ["layers", "17-33", "disk"] for line in lines)
    assert any(line.split()[:2] == ["head", "device"] for line in lines)
    assert any(line.split()[:2] == ["embed", "host"] for line in lines)
    assert "KV cache" in text and "staging" in text and "runtime reserve" in text
    assert "streamed per token (decode, batch 1): 23.56 GB" in text
    assert "of which read from disk" in text
    bound = plan.tokens_per_second_bound(25, 3.5)
    # 10 GiB of host RAM less two pinned staging slots holds 9 layers; the other 17 come from
    # disk, the slower stream here (3.5 GB/s)
    assert bound == pytest.approx(3.5e9 / (17 * LAYER_BYTES))
    assert f"{bound:.2f} tok/s" in text


def test_tokens_per_second_bound_is_the_pcie_bound_when_nothing_comes_from_disk(moss):
    plan = plan_placement(moss, device="cuda", device_memory=16 * GiB, host_memory=64 * GiB)
    assert plan.tokens_per_second_bound(25) == pytest.approx(25e9 / plan.streamed_bytes_per_token)
    assert plan.tokens_per_second_bound() is None
    everything = plan_placement(moss, device="cuda", device_memory=None, host_memory=None,
                                available_device_bytes=40 * GiB)
    assert everything.tokens_per_second_bound(25) == pytest.approx(25e9 / EMBED_ROW)
    assert "unbounded" not in everything.describe(link_gbps=25)


def test_tiny_config_plan_by_hand():
    cfg = MossConfig(vocab_size=100, n_positions=32, n_embd=16, n_layer=6, n_head=4, rotary_dim=4)
    d, inner = 16, 64
    layer = 2 * (2 * d + 4 * d * d + 2 * inner * d + inner + d)
    head = 2 * (2 * d + 100 * d + 100)
    assert (layer, head) == (6_368, 3_464)
    kv = 2 * 6 * 32 * d * 2
    probe = plan_placement(cfg, device="cuda", device_memory=None, host_memory=None)
    fixed = kv + probe.work_bytes + RUNTIME_RESERVE["cuda"]
    assert probe.kv_bytes == kv

    # Here the head is smaller than a layer (tiny vocab). On cuda a slot that streams the head
    # holds a layer Var set *and* a head set, so streaming it would cost 2 x (layer + head) of
    # slots: after two layer-sized slots the budget holds head + 1.5 layers, and keeping the head
    # and layer 0 is the best that fits (two layers plus head-carrying slots do not).
    assert slot_allocation("cuda", [2, 3, "head"], {2: layer, 3: layer, "head": head}) == {"layer": layer, "head": head}
    assert slot_allocation("cpu", [2, 3, "head"], {2: layer, 3: layer, "head": head}) == {"buffer": layer}
    budget = fixed + head + 2 * layer + layer + layer // 2
    plan = plan_placement(cfg, device="cuda", device_memory=budget, host_memory=None)
    assert plan.groups_on("device") == [0, "head"]
    assert plan.groups_on("host") == ["embed", 1, 2, 3, 4, 5]
    assert plan.staging_slot_bytes == layer and plan.slot_layouts == {"layer": layer}
    assert plan.streamed_bytes_per_token == 5 * layer + 2 * d
    assert plan.device_total_bytes <= budget
    assert "layers 1-5" in plan.describe()

    # A little less and two layers no longer fit: the head and layer 0 stay.
    budget = fixed + 2 * layer + head + layer
    plan = plan_placement(cfg, device="cuda", device_memory=budget, host_memory=None)
    assert plan.groups_on("device") == [0, "head"]

    # Exactly enough for every weight: no staging slots are needed, so everything stays.
    plan = plan_placement(cfg, device="cuda", device_memory=fixed + head + 6 * layer, host_memory=None)
    assert len(plan.resident_layers) == 6 and plan.staging_bytes == 0
    assert plan.streamed_bytes_per_token == 2 * d


def test_invalid_arguments_are_rejected(moss):
    with pytest.raises(DeviceError):
        plan_placement(moss, device="tpu", device_memory=None, host_memory=None)
    with pytest.raises(ContextLengthError):
        plan_placement(moss, device="cuda", device_memory=None, host_memory=None, max_seq_len=4096)
    for bad in (dict(prefetch_depth=0), dict(batch=0), dict(kv_dtype="int3"), dict(device_memory=-1)):
        kwargs = dict(device="cuda", device_memory=12 * GiB, host_memory=None) | bad
        with pytest.raises(BudgetError):
            plan_placement(moss, **kwargs)



# ---- offload cpu: the CPU computes what the card cannot hold ---------------------------------
from jmoss.placement import Figures, predict_decode_tok_s  # noqa: E402

PARAMS = 12 * D * D  # weights a row is multiplied by in one layer (qkv 3d^2, out d^2, MLP 8d^2)
KV_LAYER_CUDA = KV_CUDA // N_LAYER  # fp16, on the device
KV_LAYER_HOST = 2 * KV_LAYER_CUDA  # fp32, in host RAM (what the CPU kernels read)
WORK_CPU = (6 * CHUNK * D * 4 + CHUNK * 3 * D * 4 + 2 * CHUNK * D * 4 + 2 * HEADS * CHUNK * POSITIONS * 4
            + 2 * CHUNK * INNER * 4 + 2 * VOCAB * 4 + 2 * POSITIONS * ROTARY * 4)
HANDOFF_DEVICE = CHUNK * D * 4  # the hidden state of a chunk, float32, where it lands on the device
HANDOFF_HOST = CHUNK * D * 6  # the largest crossing: a streamed chunk's qkv in fp16 (3 x 2 bytes a value)
# A desktop: 12 GB card (RTX 4070 class, 504 GB/s), PCIe 4.0 x16 (~25 GB/s pinned), dual-channel
# DDR5 (the CPU kernels reading ~55 GB/s, ~700 GFLOP/s fp32 on 8 cores): stated, not measured.
DESKTOP = Figures(link_gbps=25, cpu_gbps=55, cpu_gflops=700, device_gbps=504, source="desktop, stated")


def hand_cpu_split(budget: int) -> int:
    """Layers on the device with offload cpu: head + layers with their KV cache + 2 layer slots."""
    room = budget - HEAD_BYTES - WORK_CUDA - RESERVE_CUDA - HANDOFF_DEVICE - 2 * LAYER_BYTES
    return room // (LAYER_BYTES + KV_LAYER_CUDA)


def hand_threshold(n_cpu: int, f: Figures) -> int:
    """The smallest chunk (rows) at which copying the CPU's layers beats computing them there."""
    for rows in range(2, CHUNK + 1):
        cpu = n_cpu * max(LAYER_BYTES / (f.cpu_gbps * 1e9), 2 * rows * PARAMS / (f.cpu_gflops * 1e9))
        copy = n_cpu * LAYER_BYTES / (f.link_gbps * 1e9) + 2 * n_cpu * 50e-6 + n_cpu * rows * D * 10 / (f.link_gbps * 1e9)
        if copy < cpu:
            return rows
    raise AssertionError("the CPU wins at every chunk size")


@pytest.mark.parametrize("gib", [8, 12, 16])
def test_offload_cpu_bills_each_side_by_hand(moss, gib):
    budget = gib * GiB
    plan = plan_placement(moss, device="cuda", device_memory=budget, host_memory=None, offload="cpu", figures=DESKTOP)
    n = hand_cpu_split(budget)
    assert plan.offload == "cpu" and plan.groups_on("device") == [*range(n), "head"]
    assert plan.groups_on("cpu") == list(range(n, N_LAYER)) and plan.cpu_layers == list(range(n, N_LAYER))
    assert plan.cpu_min_rows == hand_threshold(N_LAYER - n, DESKTOP)
    # the device: its layers' KV cache only, 2 layer slots for large chunks, the hand-off Var
    assert plan.kv_bytes == n * KV_LAYER_CUDA and plan.slot_layouts == {"layer": LAYER_BYTES}
    total = n * LAYER_BYTES + HEAD_BYTES + n * KV_LAYER_CUDA + WORK_CUDA + RESERVE_CUDA + 2 * LAYER_BYTES + HANDOFF_DEVICE
    assert plan.handoff_device_bytes == HANDOFF_DEVICE and plan.device_total_bytes == total <= budget
    assert total + LAYER_BYTES + KV_LAYER_CUDA > budget  # not wasteful
    # the host: the CPU's layers pinned, their KV cache in fp32, the kernels' buffers, the hand-off
    assert plan.host_bytes == (N_LAYER - n) * LAYER_BYTES and plan.host_kv_bytes == (N_LAYER - n) * KV_LAYER_HOST
    assert plan.host_work_bytes == WORK_CPU and plan.handoff_host_bytes == HANDOFF_HOST
    assert plan.host_total_bytes == plan.host_bytes + plan.host_kv_bytes + WORK_CPU + HANDOFF_HOST
    # nothing but the hidden state crosses per decode token
    assert plan.streamed_bytes_per_token == EMBED_ROW and plan.cpu_bytes_per_token == (N_LAYER - n) * LAYER_BYTES


def test_the_predictions_follow_the_timing_model(moss):
    plan = plan_placement(moss, device="cuda", device_memory=12 * GiB, host_memory=None, offload="cpu", figures=DESKTOP)
    n_cpu = len(plan.cpu_layers)
    device = (N_LAYER - n_cpu) * LAYER_BYTES + HEAD_BYTES
    decode = device / 504e9 + n_cpu * LAYER_BYTES / 55e9 + 2 * 50e-6 + 2 * D * 4 / 25e9
    assert plan.predicted_tok_s["cpu"] == pytest.approx(1 / decode)
    stream = plan_placement(moss, device="cuda", device_memory=12 * GiB, host_memory=None, offload="stream",
                            figures=DESKTOP)
    n = EXPECTED_LAYERS[12]
    assert stream.predicted_tok_s["stream"] == pytest.approx(25e9 / ((N_LAYER - n) * LAYER_BYTES))
    assert predict_decode_tok_s(stream, moss, DESKTOP) == stream.predicted_tok_s["stream"]


def test_auto_picks_the_faster_mode_and_says_why(moss):
    desktop = plan_placement(moss, device="cuda", device_memory=12 * GiB, host_memory=None, figures=DESKTOP)
    assert desktop.offload == "cpu" and desktop.offload_requested == "auto"
    assert desktop.predicted_tok_s["cpu"] > 2 * desktop.predicted_tok_s["stream"]
    assert "computing them on the CPU predicts" in desktop.reason and "55 GB/s" in desktop.reason
    # a fast link and a slow CPU: streaming wins, and says so
    slow_cpu = Figures(link_gbps=50, cpu_gbps=12, cpu_gflops=200, device_gbps=4800)
    plan = plan_placement(moss, device="cuda", device_memory=12 * GiB, host_memory=None, figures=slow_cpu)
    assert plan.offload == "stream" and not plan.hybrid and plan.reason.startswith("streaming predicts")
    assert plan.predicted_tok_s["stream"] > plan.predicted_tok_s["cpu"]
    # no speeds to compare: streaming, and how to give them
    plan = plan_placement(moss, device="cuda", device_memory=12 * GiB, host_memory=None)
    assert plan.offload == "stream" and plan.predicted_tok_s == {} and "--cpu-gbps" in plan.reason
    # everything fits: nothing to offload
    plan = plan_placement(moss, device="cuda", device_memory=40 * GiB, host_memory=None, figures=DESKTOP)
    assert not plan.streams and plan.reason == "everything fits on the device"


def test_batched_serving_grows_the_cpus_cost_not_the_links(moss):
    plan = plan_placement(moss, device="cuda", device_memory=12 * GiB, host_memory=None, figures=DESKTOP,
                          max_seq_len=256, batch=8, offload="cpu")
    stream = plan_placement(moss, device="cuda", device_memory=12 * GiB, host_memory=None, figures=DESKTOP,
                            max_seq_len=256, batch=8, offload="stream")

    def step_seconds(p, batch):  # one decode step for ``batch`` sequences
        return batch / predict_decode_tok_s(p, moss, DESKTOP, batch)

    # streaming reads the same bytes for 1 or 24 rows; the CPU, compute-bound past ~13 rows here, does not
    assert 24 < plan.cpu_min_rows <= 8 * 256
    assert step_seconds(stream, 24) == pytest.approx(step_seconds(stream, 1))
    assert step_seconds(plan, 24) > 1.5 * step_seconds(plan, 1)
    # from the threshold on, a decode step streams those layers like a prompt chunk (the large route)
    at = plan.cpu_min_rows
    assert step_seconds(plan, at) < step_seconds(plan, at - 1)
    # 48 sequences: streaming's KV cache no longer fits the card, the CPU-side one lives in host RAM
    many = plan_placement(moss, device="cuda", device_memory=12 * GiB, host_memory=None, figures=DESKTOP,
                          max_seq_len=256, batch=48)
    assert many.offload == "cpu" and "below streaming's minimum" in many.reason
    assert many.host_kv_bytes == len(many.cpu_layers) * 48 * 2 * 256 * D * 4


def test_short_host_memory_computes_the_last_groups_from_the_stores_pages(moss):
    host = 12 * GiB
    plan = plan_placement(moss, device="cuda", device_memory=12 * GiB, host_memory=host, offload="cpu",
                          figures=DESKTOP)
    n = hand_cpu_split(12 * GiB)
    fixed = (N_LAYER - n) * KV_LAYER_HOST + WORK_CPU + HANDOFF_HOST + 2 * LAYER_BYTES  # + disk staging
    n_pinned = (host - fixed) // LAYER_BYTES
    assert plan.groups_on("cpu") == list(range(n, n + n_pinned))
    assert plan.groups_on("pages") == list(range(n + n_pinned, N_LAYER))
    assert plan.host_staging_bytes == 2 * LAYER_BYTES and plan.host_total_bytes <= host
    assert plan.mapped_bytes == (N_LAYER - n - n_pinned) * LAYER_BYTES
    assert any("mapped pages" in note for note in plan.notes)
    with pytest.raises(BudgetError, match="KV cache"):
        plan_placement(moss, device="cuda", device_memory=12 * GiB, host_memory=GiB, offload="cpu", figures=DESKTOP)


def test_a_small_card_without_room_for_a_slot_computes_every_chunk_on_the_cpu(moss):
    plan = plan_placement(moss, device="cuda", device_memory=GiB, host_memory=None, offload="cpu", figures=DESKTOP)
    assert plan.cpu_min_rows is None and plan.prefetch_depth == 0 and plan.staging_bytes == 0
    assert plan.groups_on("device") == [] and len(plan.cpu_layers) == N_LAYER
    assert any("no room on the device for a staging slot" in note for note in plan.notes)
    with pytest.raises(BudgetError, match="offload cpu"):
        plan_placement(moss, device="cuda", device_memory=100 * MiB, host_memory=None, offload="cpu")


def test_offload_is_checked_and_ignored_on_cpu(moss):
    with pytest.raises(DeviceError, match="offload"):
        plan_placement(moss, device="cuda", device_memory=12 * GiB, host_memory=None, offload="gpu")
    with pytest.raises(BudgetError, match="positive number"):
        Figures(link_gbps=-1)
    with pytest.raises(BudgetError, match="split"):
        plan_placement(moss, device="cuda", device_memory=None, host_memory=None, offload="stream", split=(3, True))
    plan = plan_placement(moss, device="cpu", device_memory=8 * GiB, host_memory=None, offload="cpu")
    assert not plan.hybrid and any("offload applies to cuda" in note for note in plan.notes)


def test_a_given_split_is_planned_as_given(moss):
    plan = plan_placement(moss, device="cuda", device_memory=None, host_memory=None, offload="cpu", split=(17, True))
    assert plan.resident_layers == list(range(17)) and plan.cpu_layers == list(range(17, N_LAYER))
    assert plan.budget_bytes is None and "split was given" in plan.reason


def test_describe_explains_the_offload_and_both_predictions(moss):
    plan = plan_placement(moss, device="cuda", device_memory=12 * GiB, host_memory=None, figures=DESKTOP)
    text = plan.describe()
    lines = text.splitlines()
    assert lines[1].startswith("offload: cpu (asked auto): computing them on the CPU predicts")
    assert f"chunks of {plan.cpu_min_rows}+ rows stream them to the device" in lines[2]
    n = hand_cpu_split(12 * GiB)
    assert any(line.split()[:3] == ["layers", f"{n}-33", "cpu"] for line in lines)
    assert "host memory:" in text and "float32, the" in text and "hand-off" in text
    assert (f"expected decode tok/s at batch 1: stream {plan.predicted_tok_s['stream']:.2f}, "
            f"cpu {plan.predicted_tok_s['cpu']:.2f}") in text
    assert "link 25 GB/s" in text and "desktop, stated" in text
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["offload"] == "cpu" and data["cpu_layers"] == plan.cpu_layers and data["figures"]["cpu_gbps"] == 55


def test_info_prints_the_choice_for_the_speeds_given():
    from click.testing import CliRunner

    from jmoss.cli import main

    args = ["info", str(MOSS_CONFIG), "--device", "cuda", "--device-memory", "12GiB", "--link-gbps", "25",
            "--cpu-gbps", "55", "--cpu-gflops", "700", "--device-gbps", "504"]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    assert "offload: cpu (asked auto)" in out.output and "expected decode tok/s at batch 1: stream" in out.output
    out = CliRunner().invoke(main, args + ["--offload", "stream"])
    assert out.exit_code == 0 and "offload: stream (asked stream)" in out.output
    assert "expected decode tok/s at batch 1: stream" in out.output and ", cpu " in out.output  # both, whatever runs
