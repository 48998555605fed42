"""jmoss.kernels.decode_block (a whole layer as one op for a decode step) against the per-op path.

Both run the same C++ kernels in the same order, so logits must agree to fp32 rounding (in
practice bit for bit) on fp16 and packed int4/int8 stores, batch 2 with a left-padded row, a
short prompt that itself takes the fused path (B*T <= FUSED_MAX_ROWS), a longer one that does not,
native and AVX2 kernels, 1 and 2 threads. The KV cache the fused op writes in place must be the
cache the per-op path writes with setitem, or the decode steps after it would part. Parity with
transformers for the whole model (which now decodes through this op) is in test_model_parity.py
and test_packed_store.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import jmoss
from fixtures_checkpoints import save_gptq_checkpoint, tiny_model
from jmoss import kernels
from jmoss.converters.convert import convert
from jmoss.errors import JmossError
from jmoss.kernels import cpu as kernels_cpu
from test_engine import write_random_store

SHAPE = dict(n_embd=64, n_head=4, rotary_dim=8, n_layer=3, vocab_size=512, n_positions=64)
SHORT = [[5, 6, 7, 8, 9, 10], [1, 2, 3]]  # 2 x 6 = 12 rows: the fused path
LONG = [list(range(3, 23)), list(range(40, 52))]  # 2 x 20 rows: per-op prefill, fused decode


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("decode_block")
    out = {"fp16": write_random_store(root / "fp16", SHAPE)}
    model = tiny_model(seed=3)
    for bits in (4, 8):
        src, _ = save_gptq_checkpoint(model, root / f"src{bits}", bits, groupsize=32, seed=bits, config_wbits=bits)
        out[f"int{bits}"] = convert(str(src), root / f"int{bits}", progress=False)
    return out


def _run(model, rows: list[list[int]], steps: int = 4) -> np.ndarray:
    session = model.session(batch=len(rows), max_len=48)
    logits = [session.prefill(rows)]
    for t in range(steps):
        logits.append(session.decode([11 + t, 17 + t]))
    return np.stack(logits)


@pytest.mark.parametrize("kind", ["fp16", "int4", "int8"])
def test_fused_layer_gives_the_per_op_logits(stores, kind, monkeypatch):
    model = jmoss.load(stores[kind], device="cpu")
    assert model.ops is kernels, "the CPU kernels must be the ops here"
    calls = []
    fused = kernels_cpu.decode_block

    def counting(h, *args, **kwargs):
        y = fused(h, *args, **kwargs)
        calls.append(y is not None)
        return y

    monkeypatch.setattr(kernels, "decode_block", counting)
    for isa in ("native", "avx2"):
        for threads in (1, 2):
            for rows in (SHORT, LONG):
                with kernels.configured(isa=isa, threads=threads):
                    monkeypatch.setattr(kernels_cpu, "FUSED_MAX_ROWS", 16)
                    calls.clear()
                    got = _run(model, rows)
                    n_fused = sum(calls)
                    monkeypatch.setattr(kernels_cpu, "FUSED_MAX_ROWS", 0)
                    want = _run(model, rows)
                layers = model.config.n_layer
                # every decode step fused; the prefill too when it is short
                assert n_fused == layers * (4 + (rows is SHORT)), (kind, isa, threads, n_fused)
                scale = np.abs(want).max()
                err = np.abs(got - want).max() / scale
                assert err <= 1e-6, (kind, isa, threads, len(rows[0]), err)
                assert (got.argmax(-1) == want.argmax(-1)).all()


def test_other_layouts_fall_back_to_the_per_op_path(stores):
    """More rows than FUSED_MAX_ROWS, a bias on qkv, or fp32 activations: None, the caller goes op by op."""
    model = jmoss.load(stores["fp16"], device="cpu")
    jt = model.jt
    w = dict(model.weights.layer(0))
    d = SHAPE["n_embd"]
    cache = model.session(batch=1, max_len=32).cache
    sin = cos = jt.zeros((1, 1, 1, SHAPE["rotary_dim"] // 2), "float32")
    bias = jt.zeros((1, 1, 1, 1), "float32")
    args = (cache.keys[0], cache.values[0], sin, cos, bias, 0)
    kw = dict(eps=1e-5, rotary_dim=SHAPE["rotary_dim"])
    h = jt.zeros((1, 1, d), "float32")
    assert kernels.decode_block(h, w, *args, **kw) is not None
    assert kernels.decode_block(jt.zeros((1, kernels_cpu.FUSED_MAX_ROWS + 1, d), "float32"), w, *args, **kw) is None
    assert kernels.decode_block(h.float16(), w, *args, **kw) is None
    with_bias = {**w, "attn.qkv.bias": jt.zeros((3 * d,), "float16")}
    assert kernels.decode_block(h, with_bias, *args, **kw) is None
    fp32_weights = {**w, "attn.qkv.weight": w["attn.qkv.weight"].float32()}
    assert kernels.decode_block(h, fp32_weights, *args, **kw) is None


@pytest.mark.parametrize("kind", ["fp16", "int4"])
def test_weights_whose_shapes_disagree_with_x_or_the_cache_are_refused_not_run(stores, kind):
    """Every size the fused layer's C++ takes from a weight's shape (K, N, ldq, groups) is checked
    against x and the KV cache first: a mismatch would otherwise index outside a buffer."""
    model = jmoss.load(stores[kind], device="cpu")
    jt = model.jt
    w = dict(model.weights.layer(0))
    d = model.config.n_embd
    cache = model.session(batch=1, max_len=32).cache
    sin = cos = jt.zeros((1, 1, 1, model.config.rotary_dim // 2), "float32")
    args = (cache.keys[0], cache.values[0], sin, cos, jt.zeros((1, 1, 1, 1), "float32"), 0)
    bits = model.config.wbits if kind != "fp16" else 0
    kw = dict(eps=1e-5, rotary_dim=model.config.rotary_dim, bits=bits, group_size=model.config.groupsize)
    h = jt.zeros((1, 1, d), "float32")
    assert kernels.decode_block(h, w, *args, **kw) is not None
    if bits:
        edits = {"attn.qkv.qweight": w["attn.qkv.qweight"][:-1], "attn.out_proj.perm": w["attn.out_proj.perm"][:-1],
                 "mlp.fc_out.scales": w["mlp.fc_out.scales"][:, :-1], "mlp.fc_in.qweight": w["mlp.fc_in.qweight"][:, :-4]}
    else:
        edits = {"attn.qkv.weight": w["attn.qkv.weight"][:-1], "mlp.fc_out.weight": w["mlp.fc_out.weight"][:, :-1]}
    edits["mlp.fc_in.bias"] = w["mlp.fc_in.bias"][:-1]
    edits["ln_1.weight"] = w["ln_1.weight"][:-1]
    for name, bad in edits.items():
        with pytest.raises(JmossError, match="decode_block: the layer's weights do not fit"):
            kernels.decode_block(h, {**w, name: bad}, *args, **kw)
    if bits:
        with pytest.raises(JmossError, match="group 0"):
            kernels.decode_block(h, w, *args, **{**kw, "group_size": 0})


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_fused_layer_in_the_int8_compute_mode_gives_the_per_op_logits(stores, kind, monkeypatch):
    """quant_compute="int8" quantizes x in the packed decode kernels (quant_q8.h); the fused layer
    calls the same qlinear with the mode on, so it still agrees with the per-op path, and the
    logits differ from the fp32 mode's (the mode is really taken) by the mode's rounding only."""
    model = jmoss.load(stores[kind], device="cpu")
    for isa in ("native", "avx2"):
        with kernels.configured(isa=isa, threads=2):
            exact = _run(model, SHORT)
            with kernels.configured(quant_compute="int8"):
                monkeypatch.setattr(kernels_cpu, "FUSED_MAX_ROWS", 16)
                got = _run(model, SHORT)
                monkeypatch.setattr(kernels_cpu, "FUSED_MAX_ROWS", 0)
                want = _run(model, SHORT)
        scale = np.abs(want).max()
        assert np.abs(got - want).max() / scale <= 1e-6, (kind, isa)
        err = np.abs(got - exact).max() / np.abs(exact).max()
        assert 0 < err < 0.05, (kind, isa, err)
