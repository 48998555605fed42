"""The int8 compute mode's packed decode kernels (kernels/cpu_kernels/quant_q8.h, M < 16 rows).

x is quantized per row and block of 32 consecutive permuted positions to max|x|/127 steps, the
products are integer (vpmaddubsw / vpmaddwd; int4 on AVX-512 VNNI vpdpbusd, where the "native"
cases run it and the "avx2" ones the AVX2 tile) and the group scales and zero points are applied in
fp32. Two references: a numpy model of the same quantization in float64 (the kernel's only other
rounding is fp32 accumulation of exact integer block sums, so a tight bound), and the exact
fp32-mode result (each x off by at most its block's max/254: the mode's approximation bound).
Shapes: group sizes that are multiples of 64 and of 32 only (an int4 unit of 64 codes across two
groups), K tails inside a block and a unit, odd N (4-row tiles, 32-row chunks), M = 1..8 and 15
(the x-row tiles of 1-6 rows and splits of 4), a permutation, bias and gelu_new, 1 and 2 threads,
the native and the forced AVX2 path; codes at the int16 saturation edges; group sizes outside the
kernel's reach and the portable path keep the exact fp32 result.
"""

from __future__ import annotations

import numpy as np
import pytest

from jmoss import kernels
from jmoss.converters import gptq
from jmoss.jittor_setup import get_jittor

jt = get_jittor("cpu")
CASES = [(7, 64, 64), (33, 100, 64), (13, 300, 128), (6, 203, 32), (9, 300, 160), (37, 1031, 128)]
MS = (1, 2, 3, 4, 5, 6, 7, 8, 15)


def _gelu(y):
    return 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y**3)))


def _quantized_x(x: np.ndarray, perm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x as the kernel sees it: through perm, rounded per block of 32 to amax/127 steps, in fp32 as
    the kernel computes d and 1/d; and each position's half step (its error bound)."""
    m, k = x.shape
    nb = -(-k // 32)
    xp = np.zeros((m, nb * 32), np.float32)
    xp[:, :k] = x[:, perm]
    xb = xp.reshape(m, nb, 32)
    amax = np.abs(xb).max(axis=2, keepdims=True)
    d = amax * (np.float32(1) / np.float32(127))
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, np.float32(1)), np.float32(0))
    xh = (np.rint(xb * inv.astype(np.float32)).astype(np.float64) * d).reshape(m, -1)[:, :k]
    half = np.broadcast_to(d / 2, xb.shape).reshape(m, -1)[:, :k].astype(np.float64)
    return xh, half


def _weights(q, s, z, bits, gs, k) -> np.ndarray:
    """W in the permuted order, float64 (exact)."""
    codes = gptq.unpack_codes(q, bits, k).astype(np.float64)
    g = np.arange(k) // gs
    return (codes - z.astype(np.float64)[:, g]) * s.astype(np.float64)[:, g]


def _call(x, perm, q, s, z, b, bits, gs, act):
    args = [jt.array(a) for a in (x, perm, q, s, z)] + ([jt.array(b)] if b is not None else [])
    return kernels.quant_linear(*args, bits=bits, group_size=gs, activation=act).numpy()


@pytest.mark.parametrize("isa", ["native", "avx2"])
@pytest.mark.parametrize("bits", [4, 8])
def test_decode_kernels_match_their_quantization_and_stay_within_its_bound(isa, bits):
    rng = np.random.default_rng(200 + bits)
    with kernels.configured(isa=isa):
        assert kernels.q8_decode_ready(), "the AVX2/AVX-512 builds compile the int8 decode kernels"
    worst = 0.0
    for ci, (n, k, gs) in enumerate(CASES):
        w = rng.standard_normal((n, k)).astype(np.float32)
        q, s, z = gptq.quantize_rows(w, bits, gs)
        perm = rng.permutation(k).astype(np.int32)
        wp = _weights(q, s, z, bits, gs, k)
        b = rng.standard_normal(n).astype(np.float16) if ci % 2 else None
        bias = b.astype(np.float64) if b is not None else 0.0
        for mi, m in enumerate(MS):
            x = rng.standard_normal((m, k)).astype(np.float32)
            x[0, perm[min(5, k - 1)]] = 9.0  # an outlier: its block's step only
            act = "gelu_new" if (ci + mi) % 3 == 0 else None
            threads = 1 + (ci + mi) % 2
            with kernels.configured(isa=isa, threads=threads):
                exact = _call(x, perm, q, s, z, b, bits, gs, act)
                with kernels.configured(quant_compute="int8"):
                    got = _call(x, perm, q, s, z, b, bits, gs, act)
            xh, half = _quantized_x(x, perm)
            want = xh @ wp.T + bias
            tol = 1e-5 * (np.abs(xh) @ np.abs(wp).T + np.abs(bias)) + 1e-6
            xf = x[:, perm].astype(np.float64)
            y = xf @ wp.T + bias
            bound = half @ np.abs(wp).T * (1 + 1e-3) + 1e-5 * (np.abs(xf) @ np.abs(wp).T + np.abs(bias)) + 1e-6
            if act:
                want, tol, y, bound = _gelu(want), tol * 1.13 + 1e-6 * np.abs(want), _gelu(y), bound * 1.13
            err = np.abs(got - want)
            assert (err <= tol).all(), (isa, bits, n, k, gs, m, act, float((err / tol).max()))
            assert (np.abs(got - y) <= bound).all(), (isa, bits, n, k, gs, m, act)
            assert (np.abs(exact - y) <= bound).all()
            assert not np.array_equal(got, exact)  # the int8 kernels were taken
            if act is None:
                worst = max(worst, float(np.abs(got - y).max() / np.abs(y).max()))
    print(f"int8 decode, {bits}-bit ({isa}): max |err| / max |y| against fp32 = {worst:.2e}")


@pytest.mark.parametrize("bits", [4, 8])
def test_codes_at_the_int16_saturation_edges_are_exact(bits):
    """vpmaddubsw saturates its int16 pair sums: int8 codes 0 and 255 (w' = -128, 127) against x at
    +-127 steps, and int4 codes 0 and 15, must still give the reference sums."""
    rng = np.random.default_rng(9)
    n, k, gs = 8, 256, 64
    top = 2**bits - 1
    codes = np.where(rng.random((n, k)) < 0.5, 0, top).astype(np.int64)
    codes[0] = 0
    codes[1] = top
    if bits == 8:
        q = codes.astype(np.uint8)
    else:
        q = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    s = np.full((n, k // gs), 0.5, np.float16)
    z = np.full((n, k // gs), 2**(bits - 1), np.float16)
    perm = np.arange(k, dtype=np.int32)
    x = np.where(rng.random((2, k)) < 0.5, -1.0, 1.0).astype(np.float32)
    x[1] = -1.0
    with kernels.configured(quant_compute="int8"):
        got = _call(x, perm, q, s, z, None, bits, gs, None)
    want = x.astype(np.float64) @ _weights(q, s, z, bits, gs, k).T  # +-1 is exact at 127 steps
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_group_sizes_off_the_block_and_the_portable_path_keep_fp32(bits):
    rng = np.random.default_rng(5)
    for isa, gs in (("native", 48), ("native", 30), ("avx2", 16), ("portable", 64)):
        n, k = 11, 200
        q, s, z = gptq.quantize_rows(rng.standard_normal((n, k)).astype(np.float32), bits, gs)
        perm = rng.permutation(k).astype(np.int32)
        x = rng.standard_normal((3, k)).astype(np.float32)
        with kernels.configured(isa=isa):
            exact = _call(x, perm, q, s, z, None, bits, gs, None)
            with kernels.configured(quant_compute="int8"):
                got = _call(x, perm, q, s, z, None, bits, gs, None)
        assert np.array_equal(got, exact), (isa, gs)
