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


def store_dequantize(arrays: dict[str, np.ndarray], prefix: str, bits: int, group_size: int) -> np.ndarray:
    """docs/store-format.md in float64: W[n, perm[j]] = scales[n, j div GS] * (code[n, j] - zeros[n, j div GS])."""
    perm, q = arrays[f"{prefix}.perm"], arrays[f"{prefix}.qweight"]
    k_in = perm.shape[0]
    j = np.arange(k_in)
    codes = q[:, j] if bits == 8 else (q[:, j // 2] >> (4 * (j % 2)).astype(np.uint8)) & 15
    g = j // group_size
    w = np.empty(codes.shape, np.float64)
    w[:, perm] = arrays[f"{prefix}.scales"].astype(np.float64)[:, g] * (codes - arrays[f"{prefix}.zeros"].astype(np.float64)[:, g])
    return w


def reference_model(model, src: Path, store: Store | None = None):
    """The tiny model with every GPTQ Linear replaced by its exact dequantization (fp32), and, when
    the store packed them (the default), lm_head and wte replaced by the store's dequantized ones."""
    tensors = torch.load(src / "pytorch_model.bin", weights_only=True)
    ref = tiny_model(seed=1)
    sd = ref.state_dict()
    for name in list(sd):
        base = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and base.split(".", 3)[-1] in QUANTIZED:
            w = spec_dequantize(tensors, base)
            assert np.abs(w.astype(np.float32) - w).max() == 0  # exact in fp32 too
            sd[name] = torch.from_numpy(w.astype(np.float32))
    config = store.config if store is not None else None
    for group, prefix, hf, bits in ((layout.HEAD, "lm_head", "lm_head.weight", config and config.head_wbits),
                                    (layout.EMBED, "wte", "transformer.wte.weight", config and config.embed_wbits)):
        if bits in (4, 8):
            w = store_dequantize(store.group(group), prefix, bits, config.groupsize)
            assert np.abs(w.astype(np.float32) - w).max() == 0
            original = sd[hf].numpy().astype(np.float64)  # round-to-nearest: within one step of the fp16 source
            step = np.abs(original).max() * 2 / ((1 << bits) - 1)
            assert 0 < np.abs(w - original).max() <= step
            sd[hf] = torch.from_numpy(w.astype(np.float32))
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

    # lm_head and wte are packed too by default (int8 both, whatever the layers' width), recorded in the manifest
    assert config.head_wbits == 8 and config.embed_wbits == 8
    assert manifest["packed"]["lm_head"] == {"bits": 8, "group_size": 32, "scheme": "rtn"}
    assert manifest["packed"]["wte"] == {"bits": 8, "group_size": 32, "scheme": "rtn"}
    assert "lm_head.weight" not in store.group(layout.HEAD) and store.group(layout.EMBED)["wte.qweight"].dtype == np.uint8
    ref = reference_model(model, src, store)
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
    streamed = jmoss.load(str(out), device="cpu", device_memory=minimum + (16 << 10))
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
    assert manifest["packed"] == {"bits": bits, "group_size": 128, "layout": manifest["packed"]["layout"], "scheme": "rtn",
                                  "lm_head": {"bits": 8, "group_size": 128, "scheme": "rtn"},
                                  "wte": {"bits": 8, "group_size": 128, "scheme": "rtn"}}
    kept = convert(str(src), tmp_path / "kept", progress=False, quantize=f"int{bits}", keep_head_fp16=True)
    kept_manifest = json.loads((kept / MANIFEST).read_text())["packed"]
    assert kept_manifest["lm_head"] == kept_manifest["wte"] == "float16"
    assert "lm_head.weight" in Store.open(kept).group(layout.HEAD)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(1, 24))
    want = jmoss.load(str(fp16), device="cpu").logits(ids)
    size = lambda p, pattern: sum(f.stat().st_size for f in p.glob(pattern))  # noqa: E731
    errors = {}
    for name, store in (("packed head", packed), ("--keep-head-fp16", kept)):
        got = jmoss.load(str(store), device="cpu").logits(ids)
        errors[name] = rel = float(np.abs(got - want).max() / np.abs(want).max())
        layers = size(store, "layer_*.safetensors") / size(fp16, "layer_*.safetensors")
        whole = size(store, "*.safetensors") / size(fp16, "*.safetensors")
        with capsys.disabled():
            print(f"\n--quantize int{bits} ({name}): logits max error {rel:.2e} of max|logit| vs fp16; "
                  f"layer bytes {layers:.3f}x fp16, store {whole:.3f}x fp16")
        assert rel < (0.02 if bits == 8 else 0.2)
        assert layers < (0.6 if bits == 8 else 0.35)  # d = 64: headers, LayerNorms, biases and perms weigh in
    assert size(packed, "*.safetensors") < size(kept, "*.safetensors")


def test_keep_head_fp16_is_for_packed_stores_only(model, tmp_path: Path) -> None:
    src = save_torch_shards(model, tmp_path / "src")
    with pytest.raises(CheckpointError, match="--keep-head-fp16 is for packed stores"):
        convert(str(src), tmp_path / "out", progress=False, keep_head_fp16=True)
    with pytest.raises(CheckpointError, match="--head-bits is for packed stores"):
        convert(str(src), tmp_path / "out", progress=False, head_bits=8)
    with pytest.raises(CheckpointError, match="give either it or the widths"):
        convert(str(src), tmp_path / "out", progress=False, quantize="int4", keep_head_fp16=True, head_bits=8)


def test_the_default_packed_head_stays_within_1e_2_of_an_fp16_head(model, tmp_path: Path, report) -> None:
    """A GPTQ int4 checkpoint converted with the defaults (lm_head int8, wte int8) against transformers
    running the exact dequantized GPTQ layers with the checkpoint's own fp16 lm_head and wte: the
    default's logits are within 1e-2 of max|logit|; --head-bits 4 (the old default) is not."""
    src, _ = save_gptq_checkpoint(model, tmp_path / "src", 4, groupsize=32, seed=7)
    ref = reference_model(model, src)  # exact GPTQ layers, fp16 lm_head and wte
    ids = np.random.default_rng(4).integers(0, model.config.vocab_size, size=(2, 24))
    with torch.no_grad():
        want = ref(torch.from_numpy(ids)).logits.numpy()
    errors = {}
    for label, kwargs in (("default (lm_head int8, wte int8)", {}), ("--head-bits 4", {"head_bits": 4}),
                          ("--head-bits 16", {"head_bits": 16}), ("--keep-head-fp16", {"keep_head_fp16": True})):
        out = convert(str(src), tmp_path / label.replace(" ", "_"), progress=False, **kwargs)
        got = jmoss.load(str(out), device="cpu").logits(ids)
        errors[label] = float(np.abs(got - want).max() / np.abs(want).max())
    report("GPTQ int4 store logits vs exact layers + fp16 lm_head/wte, max error / max|logit|: "
           + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert errors["default (lm_head int8, wte int8)"] <= 1e-2
    assert errors["--head-bits 4"] > 2 * errors["default (lm_head int8, wte int8)"]
    assert errors["--keep-head-fp16"] <= 1e-4


def test_a_format_2_store_from_before_packed_heads_still_loads(model, tmp_path: Path) -> None:
    """A store whose config.json and manifest say nothing of lm_head/wte (written before they could be
    packed) has them fp16, and loads as such."""
    from jmoss.store import bytes_record, sealed_manifest_bytes

    src = save_torch_shards(model, tmp_path / "src")
    out = convert(str(src), tmp_path / "out", progress=False, quantize="int8", keep_head_fp16=True)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(1, 12))
    want = jmoss.load(str(out), device="cpu").logits(ids)
    config = json.loads((out / "config.json").read_text())
    del config["head_wbits"], config["embed_wbits"]
    data = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    (out / "config.json").write_bytes(data)
    manifest = json.loads((out / MANIFEST).read_text())
    del manifest["checksum"], manifest["packed"]["lm_head"], manifest["packed"]["wte"]
    manifest["files"]["config.json"] = bytes_record(data)
    (out / MANIFEST).write_bytes(sealed_manifest_bytes(manifest))
    store = Store.open(out)
    assert (store.config.head_wbits, store.config.embed_wbits) == (32, 32)
    verify(out)
    np.testing.assert_array_equal(jmoss.load(str(out), device="cpu").logits(ids), want)
    from click.testing import CliRunner

    from jmoss.cli import main

    info = CliRunner().invoke(main, ["info", str(out), "--device", "cpu"])
    assert info.exit_code == 0 and "(lm_head fp16)" in info.output and "(wte fp16)" in info.output, info.output


def test_plain_jittor_packed_head_is_dequantized_one_tile_at_a_time(monkeypatch) -> None:
    """JittorOps (the CUDA path) never makes a whole packed lm_head in fp32: tiles of rows, same result."""
    import jmoss.model as model_module
    from jmoss.jittor_setup import get_jittor

    jt = get_jittor("cpu")
    rng = np.random.default_rng(3)
    n, k, gs = 70, 96, 32
    w = rng.standard_normal((n, k)).astype(np.float32)
    q, s, z = gptq.quantize_rows(w, 4, gs)
    perm = np.arange(k, dtype=np.int32)
    x = rng.standard_normal((2, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float16)
    want = x.astype(np.float64) @ gptq.dequantize_packed(q, s, z, perm, 4, gs).T.astype(np.float64) + b
    made = []
    real = model_module.dequantize_rows
    monkeypatch.setattr(model_module, "dequantize_rows", lambda jt_, qw, *a: made.append(int(qw.shape[0])) or real(jt_, qw, *a))
    monkeypatch.setattr(model_module, "DEQUANT_WHOLE_MAX", n * k - 1)
    monkeypatch.setattr(model_module, "DEQUANT_TILE", 16 * k)
    args = [jt.array(a) for a in (x, perm, q, s, z, b)]
    got = model_module.JittorOps(jt).quant_linear(*args, bits=4, group_size=gs).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert made == [16, 16, 16, 16, 6]
    assert model_module.dequant_transient_bytes([(n, k)]) == 4 * 16 * k


def moss_int4_config(shared_dir: Path):
    """A real MOSS int4 config: moss-moon-003-sft-plugin-int4's config.json (the sft-int4 one is not
    among the shared assets; moss-spec §2.2: the int4 repos share the architecture, wbits 4, group 128)."""
    from jmoss.config import MossConfig

    data = json.loads((shared_dir / "assets/moss-moon-003-sft-plugin-int4/config.json").read_text())
    assert (data["wbits"], data["groupsize"], data["n_layer"], data["n_embd"]) == (4, 128, 34, 6144)
    return MossConfig.from_dict(data)


def test_info_plans_moss_int4_store_under_9_6_gb_resident_under_12gib(shared_dir: Path, tmp_path: Path) -> None:
    """The plan figure for moss-moon-003-sft-plugin-int4, computed without writing a store: layers
    packed (GPTQ kept), lm_head int8 and wte int8 by default; 9.22 GB with --head-bits 4, 10.82 GB
    with --keep-head-fp16."""
    from click.testing import CliRunner

    from jmoss.cli import main

    config = moss_int4_config(shared_dir)
    d, inner, vocab = 6144, 4 * 6144, 107008
    # a layer: int4 codes (K/2 bytes per row) + fp16 scales and zeros per 128 inputs + perms + fp16 LN/biases
    codes = (3 * d * d + d * d + inner * d + d * inner) // 2
    groups = 3 * d * (d // 128) + d * (d // 128) + inner * (d // 128) + d * (inner // 128)
    layer = codes + 4 * groups + 4 * (3 * d + inner) + 2 * (2 * d + inner + d)
    assert layout.group_nbytes(config, 0) == layout.group_nbytes(config, 0) == layer  # 241 MB (906 MB fp16)
    head = vocab * d + 4 * vocab * (d // 128) + 4 * d + 2 * (2 * d + vocab)  # int8 lm_head + fp16 ln_f, bias
    embed = vocab * d + 4 * vocab * (d // 128) + 4 * d  # int8 rows + scales/zeros + perm
    assert layout.group_nbytes(config, layout.HEAD) == head
    assert layout.group_nbytes(config, layout.EMBED) == embed
    total = layout.store_nbytes(config)
    assert total == 34 * layer + head + embed and total <= 9.6e9  # 9.55 GB
    head4 = layout.resolved(config, head_width=4)
    assert layout.store_nbytes(head4) == total - head + vocab * d // 2 + 4 * vocab * (d // 128) + 4 * d + 2 * (2 * d + vocab)
    fp16_head = layout.resolved(config, keep_head_fp16=True)
    assert layout.store_nbytes(fp16_head) == 34 * layer + 2 * (2 * vocab * d + 2 * d + vocab)  # 10.82 GB

    plan = plan_placement(config, device="cuda", device_memory=12 << 30, host_memory=None)
    assert plan.groups_on("device") == layout.all_groups(config)[1:]  # every layer and the head resident
    assert plan.resident_bytes == 34 * layer + head  # 8.87e9 bytes
    assert plan.embed_row_bytes == d + 4 * (d // 128)  # an int8 row and its scales/zeros
    small = plan_placement(config, device="cuda", device_memory=8 << 30, host_memory=None)
    streamed = [g for g in small.groups_on("host") + small.groups_on("disk") if g != layout.EMBED]
    assert streamed and small.streamed_bytes_per_token == (
        sum(layout.group_nbytes(config, g) for g in streamed) + small.embed_row_bytes)

    # `jmoss info` on the checkpoint's config prints the same figures (no weights needed or read)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    result = CliRunner().invoke(main, ["info", str(tmp_path), "--device", "cuda", "--device-memory", "12GiB"])
    assert result.exit_code == 0, result.output
    assert f"store: {total / 1e9:.2f} GB = layers {34 * layer / 1e9:.2f} GB (int4)" in result.output
    assert "store: 9.55 GB" in result.output
    assert "(lm_head int8)" in result.output and "(wte int8)" in result.output
    assert "34 layers + head" in result.output and "unallocated" in result.output
    for flags, size, widths in ((["--keep-head-fp16"], "10.82", ("fp16", "fp16")), (["--head-bits", "4"], "9.22", ("int4", "int8")),
                                (["--head-bits", "16"], "10.18", ("fp16", "int8")),
                                (["--head-bits", "16", "--embed-bits", "16"], "10.82", ("fp16", "fp16"))):
        out = CliRunner().invoke(main, ["info", str(tmp_path), "--device", "cuda", "--device-memory", "12GiB", *flags])
        assert f"store: {size} GB" in out.output and f"(lm_head {widths[0]})" in out.output, out.output
        assert f"(wte {widths[1]})" in out.output, out.output
    clash = CliRunner().invoke(main, ["info", str(tmp_path), "--keep-head-fp16", "--head-bits", "8"])
    assert clash.exit_code == 2 and "--keep-head-fp16 is --head-bits 16 --embed-bits 16" in clash.output
