"""Packed stores (format 2) end to end: GPTQ int4/int8 kept packed, --quantize, loading, streaming.

The reference is transformers' CodeGen running the GPTQ weights dequantized exactly (float64 from
moss-spec §2.4, written here independently of converters/gptq.py) with fp32 activations.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import jmoss
from fixtures_checkpoints import QUANTIZED, save_gptq_checkpoint, save_torch_shards, tiny_model
from jmoss import layout
from jmoss.converters import gptq
from jmoss.converters.convert import convert
from jmoss.errors import CheckpointError, DeviceError, StoreError
from jmoss.placement import plan_placement
from jmoss.store import MANIFEST, Store, verify


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1)


def spec_dequantize(tensors: dict[str, torch.Tensor], base: str) -> np.ndarray:
    """moss-spec §2.4 in float64: W[n, k] = scales[g, n] * (q[k, n] - (stored zero + 1))."""
    qweight = tensors[f"{base}.qweight"].numpy().view(np.uint32)
    qzeros = tensors[f"{base}.qzeros"].numpy().view(np.uint32)
    scales = tensors[f"{base}.scales"].numpy().astype(np.float64)
    g_idx = tensors[f"{base}.g_idx"].numpy().astype(np.int64)
    k_in = g_idx.shape[0]
    bits = 32 * qweight.shape[0] // k_in
    pack, mask = 32 // bits, (1 << bits) - 1
    k = np.arange(k_in)
    q = (qweight[k // pack] >> (bits * (k % pack))[:, None].astype(np.uint32)) & mask  # [in, out]
    n = np.arange(scales.shape[1])
    z = ((qzeros[:, n // pack] >> (bits * (n % pack))[None, :].astype(np.uint32)) & mask) + 1  # [G, out]
    return (scales[g_idx] * (q.astype(np.float64) - z[g_idx])).T


def reference_model(model, src: Path):
    """The tiny model with every GPTQ Linear replaced by its exact dequantization (fp32)."""
    tensors = torch.load(src / "pytorch_model.bin", weights_only=True)
    ref = tiny_model(seed=1)
    sd = ref.state_dict()
    for name in list(sd):
        base = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and base.split(".", 3)[-1] in QUANTIZED:
            w = spec_dequantize(tensors, base)
            assert np.abs(w.astype(np.float32) - w).max() == 0  # exact in fp32 too
            sd[name] = torch.from_numpy(w.astype(np.float32))
    ref.load_state_dict(sd)
    return ref


def greedy(m, ids: list[int], n: int) -> list[int]:
    session = m.session(max_len=len(ids) + n)
    logits = session.prefill([ids])
    out = []
    for _ in range(n):
        out.append(int(np.argmax(logits[0])))
        logits = session.decode([out[-1]])
    return out


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_kept_packed_matches_transformers_on_exact_dequantized_weights(model, tmp_path: Path, bits: int) -> None:
    src, _ = save_gptq_checkpoint(model, tmp_path / "src", bits, groupsize=32, seed=bits, config_wbits=4)
    out = convert(str(src), tmp_path / "out", progress=False)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["format_version"] == 2 and manifest["packed"]["bits"] == bits
    assert manifest["packed"]["group_size"] == 32 and manifest["source"]["quantization"]["kept_packed"]
    verify(out)
    store = Store.open(out)
    assert store.config.wbits == bits
    layer = store.group(0)
    assert layer["attn.qkv.qweight"].dtype == np.uint8 and layer["mlp.fc_out.perm"].dtype == np.int32
    assert "attn.qkv.weight" not in layer
    # the GPTQ integers are kept, not requantized: the store's Linear equals the spec's dequantization
    tensors = torch.load(src / "pytorch_model.bin", weights_only=True)
    config = store.config
    for i in range(config.n_layer):
        arrays = store.group(i)
        for prefix, hf in (("attn.qkv", "attn.qkv_proj"), ("mlp.fc_out", "mlp.fc_out")):
            w = gptq.dequantize_packed(arrays[f"{prefix}.qweight"], arrays[f"{prefix}.scales"],
                                       arrays[f"{prefix}.zeros"], arrays[f"{prefix}.perm"], bits, 32)
            want = layout.relayout(f"{prefix}.weight", spec_dequantize(tensors, f"transformer.h.{i}.{hf}"), config)
            assert np.array_equal(w, want)
    # a packed layer is far smaller than fp16
    fp16 = layout.group_nbytes(jmoss.config.MossConfig.from_dict({**config.to_dict(), "wbits": 32}), 0)
    assert store.group_nbytes(0) < fp16 * (0.4 if bits == 4 else 0.65)

    ref = reference_model(model, src)
    ids = np.random.default_rng(bits).integers(0, config.vocab_size, size=(2, 21))
    m = jmoss.load(str(out), device="cpu")
    got = m.logits(ids)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids)).logits.numpy()
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel <= 1e-4, rel
    prompt = [int(t) for t in ids[0, :8]]
    with torch.no_grad():
        ref_tokens = ref.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, 8:].tolist()
    assert greedy(m, prompt, 32) == ref_tokens

    # streamed under a budget: the engine moves packed bytes and gives the same logits
    minimum = plan_placement(config, device="cpu", device_memory=1 << 40, host_memory=None).minimum_device_bytes
    streamed = jmoss.load(str(out), device="cpu", device_memory=minimum + (64 << 10))
    assert streamed.plan.groups_on("disk")
    streamed.weights.stats.reset()
    np.testing.assert_allclose(streamed.logits(ids), got, rtol=0, atol=1e-5)
    per_forward = sum(store.group_data_span(g)[1] for g in streamed.weights.streamed_groups)
    assert streamed.weights.stats.bytes_per_forward == per_forward == streamed.plan.disk_bytes_per_token
    streamed.weights.close()
    with pytest.raises(DeviceError, match="dequantize"):
        jmoss.load(str(out), device="cpu", dtype="float32")


def test_dequantize_keeps_fp16_and_a_rerun_in_another_mode_is_refused(model, tmp_path: Path) -> None:
    src, _ = save_gptq_checkpoint(model, tmp_path / "src", 4, groupsize=32)
    out = convert(str(src), tmp_path / "out", progress=False, dequantize=True)
    assert Store.open(out).config.wbits == 32
    assert json.loads((out / MANIFEST).read_text())["format_version"] == 1  # fp16 stores stay format 1
    with pytest.raises(StoreError, match="fp16"):
        convert(str(src), tmp_path / "out", progress=False)
    with pytest.raises(CheckpointError, match="without --quantize"):
        convert(str(src), tmp_path / "other", progress=False, quantize="int8")


def test_uneven_act_order_groups_are_refused_with_the_way_out() -> None:
    g_idx = np.array([0, 0, 0, 1], np.int32)
    with pytest.raises(CheckpointError, match="--dequantize"):
        gptq.act_order_perm("x", g_idx, 2)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_an_fp16_checkpoint_reports_error_and_size(model, tmp_path: Path, bits: int, capsys) -> None:
    src = save_torch_shards(model, tmp_path / "src")
    fp16 = convert(str(src), tmp_path / "fp16", progress=False)
    packed = convert(str(src), tmp_path / "q", progress=False, quantize=f"int{bits}")
    manifest = json.loads((packed / MANIFEST).read_text())
    assert manifest["packed"] == {"bits": bits, "group_size": 128, "layout": manifest["packed"]["layout"], "scheme": "rtn"}
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(1, 24))
    want = jmoss.load(str(fp16), device="cpu").logits(ids)
    got = jmoss.load(str(packed), device="cpu").logits(ids)
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    size = lambda p: sum(f.stat().st_size for f in p.glob("layer_*.safetensors"))  # noqa: E731
    ratio = size(packed) / size(fp16)
    with capsys.disabled():
        print(f"\n--quantize int{bits}: logits max error {rel:.2e} of max|logit| vs fp16; layer bytes {ratio:.3f}x fp16")
    assert rel < (0.02 if bits == 8 else 0.2)
    assert ratio < (0.6 if bits == 8 else 0.35)  # d = 64: headers, LayerNorms, biases and perms weigh in


def test_info_plans_moss_int4_packed_and_resident_under_12gib() -> None:
    """moss-moon-003-sft-int4 (moss-spec §2.2 shapes: wbits 4, groupsize 128): the plan counts packed bytes."""
    from jmoss.config import MossConfig

    config = MossConfig.from_dict({"model_type": "moss", "n_embd": 6144, "n_layer": 34, "n_head": 24,
                                   "rotary_dim": 64, "vocab_size": 107008, "n_positions": 2048, "wbits": 4,
                                   "groupsize": 128})
    # a layer: int4 codes (K/2 bytes per row) + fp16 scales and zeros per 128 inputs + perms + fp16 LN/biases
    d, inner = 6144, 4 * 6144
    codes = (3 * d * d + d * d + inner * d + d * inner) // 2
    groups = 3 * d * (d // 128) + d * (d // 128) + inner * (d // 128) + d * (inner // 128)
    layer = codes + 4 * groups + 4 * (3 * d + inner) + 2 * (2 * d + inner + d)
    assert layout.group_nbytes(config, 0) == layer  # 241 MB, against 906 MB in fp16
    total = sum(layout.group_nbytes(config, g) for g in layout.all_groups(config))
    assert total == 34 * layer + 2 * (2 * 107008 * 6144 + 2 * 6144 + 107008)  # + fp16 wte, lm_head, ln_f
    plan = plan_placement(config, device="cuda", device_memory=12 << 30, host_memory=None)
    assert plan.groups_on("device") == layout.all_groups(config)[1:]  # every layer and the head resident
    assert plan.resident_bytes == total - layout.group_nbytes(config, layout.EMBED)  # 9.51e9 bytes
    small = plan_placement(config, device="cuda", device_memory=8 << 30, host_memory=None)
    streamed = [g for g in small.groups_on("host") + small.groups_on("disk") if g != layout.EMBED]
    assert streamed and small.streamed_bytes_per_token == (
        sum(layout.group_nbytes(config, g) for g in streamed) + small.embed_row_bytes)
