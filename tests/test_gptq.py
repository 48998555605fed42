"""converters/gptq.py: MOSS GPTQ int4/int8 tensors dequantize to exactly the values they pack."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures_checkpoints import gptq_pack
from jmoss.converters import gptq
from jmoss.errors import CheckpointError


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_dequantize_equals_the_packed_quantized_values(bits: int, act_order: bool) -> None:
    rng = np.random.default_rng(bits)
    weight = rng.normal(0, 0.05, size=(96, 128)).astype(np.float16)
    tensors, expected = gptq_pack(weight, bits, groupsize=32, rng=rng, act_order=act_order)
    got = gptq.dequantize(**tensors)
    assert got.dtype == np.float16 and got.shape == (96, 128)
    assert np.array_equal(got, expected)
    # and the quantization is a real one: close to the original weight, within half a step
    step = tensors["scales"].astype(np.float32).max()
    assert np.abs(got.astype(np.float32) - weight).max() <= step


@pytest.mark.parametrize("bits", [4, 8])
def test_bits_and_groups_come_from_shapes(bits: int) -> None:
    rng = np.random.default_rng(0)
    tensors, _ = gptq_pack(rng.normal(size=(64, 256)).astype(np.float16), bits, groupsize=128, rng=rng)
    spec = gptq.infer_spec("fc_out", **tensors)
    assert (spec.bits, spec.groups, spec.in_features, spec.out_features) == (bits, 2, 256, 64)
    assert tensors["qweight"].shape == (256 * bits // 32, 64)  # moss-spec §2.2
    assert tensors["qzeros"].shape == (2, 64 * bits // 32)


def test_row_subset_is_the_same_rows_of_the_full_matrix() -> None:
    rng = np.random.default_rng(1)
    tensors, expected = gptq_pack(rng.normal(size=(64, 64)).astype(np.float16), 4, 16, rng)
    spec = gptq.infer_spec("qkv", **tensors)
    zeros = gptq.unpack_zeros(tensors["qzeros"], 4)
    rows = rng.permutation(64)[:20]
    got = gptq.dequantize_rows(tensors["qweight"], zeros, tensors["scales"], tensors["g_idx"], spec, rows)
    assert np.array_equal(got, expected[rows])


def test_stored_zero_nibble_0xF_decodes_as_16() -> None:
    # moss-spec §2.5: zero is stored minus one, so 0xF means 16 and must not wrap to 0
    qzeros = np.array([[-1]], dtype=np.int32)  # eight 0xF nibbles
    assert (gptq.unpack_zeros(qzeros, 4) == 16).all()


def test_hand_packed_word_decodes_lsb_first() -> None:
    # in=8, out=8, one group, 4-bit: qweight row 0 packs k=0..7 at bits 4k, for every column n
    qweight = np.full((1, 8), 0x76543210, dtype=np.uint32).view(np.int32)
    qzeros = np.zeros((1, 1), dtype=np.int32)  # zero - 1 = 0 -> zero 1 for every n
    scales = np.full((1, 8), 0.5, dtype=np.float16)
    w = gptq.dequantize(qweight, qzeros, scales, np.zeros(8, np.int32))
    assert np.array_equal(w, np.tile((np.arange(8) - 1) * 0.5, (8, 1)).astype(np.float16))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.update(g_idx=t["g_idx"][:-8]), "supported bit width"),
        (lambda t: t.update(scales=t["scales"][:, :-1]), "scales"),
        (lambda t: t.update(qzeros=t["qzeros"][:1]), "qzeros"),
        (lambda t: t.update(g_idx=t["g_idx"] + 5), "g_idx refers to groups"),
    ],
)
def test_inconsistent_tensors_are_a_clear_error(change, message: str) -> None:
    rng = np.random.default_rng(2)
    tensors, _ = gptq_pack(rng.normal(size=(32, 64)).astype(np.float16), 4, 32, rng)
    change(tensors)
    with pytest.raises(CheckpointError, match=message):
        gptq.dequantize(**tensors, name="transformer.h.0.mlp.fc_in")


@settings(max_examples=30, deadline=None)
@given(
    bits=st.sampled_from([2, 4, 8]),
    out_blocks=st.integers(1, 4),
    in_blocks=st.integers(1, 4),
    groupsize=st.sampled_from([16, 32, 64]),
    seed=st.integers(0, 2**16),
)
def test_any_packed_matrix_round_trips(bits: int, out_blocks: int, in_blocks: int, groupsize: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 1, size=(32 * out_blocks, 32 * in_blocks)).astype(np.float16)
    tensors, expected = gptq_pack(weight, bits, groupsize, rng)
    assert np.array_equal(gptq.dequantize(**tensors), expected)
