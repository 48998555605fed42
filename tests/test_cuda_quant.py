"""The dequantizing CUDA kernels' arithmetic, run through their CPU build (kernels/cuda_quant.py).

The GPU build shares the macros that index and dequantize; only the launch and the warp-shuffle
sum differ (compiled by benchmarks/cuda_build_check.py, not run here: no GPU). References are
float64 numpy over odd shapes, group tails and both widths.
"""

from __future__ import annotations

import numpy as np
import pytest

from jmoss import layout
from jmoss.jittor_setup import get_jittor
from jmoss.kernels import cuda_quant

jt = get_jittor("cpu")


def _packed(rng, n_out: int, k_in: int, bits: int, group: int):
    codes = rng.integers(0, 1 << bits, size=(n_out, k_in))
    g = layout.packed_groups(k_in, group)
    scales = (rng.random((n_out, g)) * 0.02 + 0.001).astype(np.float16)
    zeros = rng.integers(0, 1 << bits, size=(n_out, g)).astype(np.float16)
    perm = rng.permutation(k_in).astype(np.int32)
    cols = np.arange(k_in) // group
    w_perm = (codes - zeros.astype(np.float64)[:, cols]) * scales.astype(np.float64)[:, cols]  # [N, K], position j
    w = np.empty_like(w_perm)
    w[:, perm] = w_perm  # W[n, perm[j]] = w_perm[n, j]
    return layout.pack_codes(codes, bits), scales, zeros, perm, w


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m,n_out,k_in,group", [(1, 37, 200, 64), (3, 64, 128, 128), (8, 5, 1000, 128),
                                                 (9, 33, 264, 8), (40, 17, 136, 128)])
def test_quant_linear_matches_float64(bits, m, n_out, k_in, group):
    rng = np.random.default_rng(m * 1000 + n_out + bits)
    q, s, z, perm, w = _packed(rng, n_out, k_in, bits, group)
    x = rng.standard_normal((m, k_in)).astype(np.float32)
    y = cuda_quant.quant_linear(jt, jt.array(x), jt.array(perm), jt.array(q), jt.array(s), jt.array(z),
                                bits=bits, group_size=group, cuda=False).numpy()
    want = x.astype(np.float64) @ w.T
    assert y.shape == (m, n_out)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_prefill_tiles_cover_every_row(monkeypatch):
    """A tile smaller than the weight: rows are split across several dequantized tiles."""
    monkeypatch.setattr(cuda_quant, "TILE_VALUES", 3 * 136)
    rng = np.random.default_rng(7)
    q, s, z, perm, w = _packed(rng, 10, 136, 4, 8)
    x = rng.standard_normal((12, 136)).astype(np.float32)
    y = cuda_quant.quant_linear(jt, jt.array(x), jt.array(perm), jt.array(q), jt.array(s), jt.array(z),
                                bits=4, group_size=8, cuda=False).numpy()
    np.testing.assert_allclose(y, x.astype(np.float64) @ w.T, rtol=1e-4, atol=1e-3)
    assert cuda_quant.transient_bytes(136, 10) == 4 * 136 * 3


def test_supports_only_word_aligned_groups():
    assert cuda_quant.supports(4, 128, 64) and cuda_quant.supports(8, 8, 4)
    assert not cuda_quant.supports(4, 100, 64) and not cuda_quant.supports(3, 128, 64)
