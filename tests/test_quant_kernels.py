"""jmoss.kernels.quant_linear (packed int8/int4 weights) against float64 numpy.

The packed weight is dequantized in float64 by ``gptq.dequantize_packed``'s formula, so the only
rounding in the kernel is fp32 accumulation (the codes, zeros and fp16 scales are exact in fp32,
and (q - z) * s is exact). The GEMV splits each group's sum into s * (x.q) - s * z * sum(x), two
sums of the same size as the plain dot product, so the bound is the fp32 one of test_kernels with
|z| + |q| in place of |q - z| (the AVX-512 int4 GEMV looks up (q - z) * s itself, a plain dot product,
well inside it). Shapes cover K tails below a vector, groups cut short by K, odd N
(the 4-row tile and 32-row chunks), group sizes that are and are not multiples of the vector
width, M = 1 and 3 (fused GEMV), 4 (4-row dequantized panels, 4x4 tiles) and 17, 40, 70 (panels
dequantized per thread + the outer-product GEMM: a partial 2-vector block of x rows, full blocks
and short ones; N not multiples of the 12- or 6-row panels; a long K over two x^T slabs), the
native, AVX2 (forced, also on an AVX-512 CPU) and portable paths, 1 and 2 threads, an input
permutation, bias and gelu_new.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from jmoss import kernels
from jmoss.converters import gptq
from jmoss.errors import JmossError
from jmoss.jittor_setup import get_jittor

jt = get_jittor("cpu")
U = 2.0**-24
CASES = [(1, 1, 32), (7, 13, 32), (33, 100, 32), (67, 1031, 128), (130, 300, 128), (5, 64, 48), (13, 4100, 128)]


def _packed(rng, n, k, bits, gs):
    w = rng.standard_normal((n, k)).astype(np.float32)
    q, s, z = gptq.quantize_rows(w, bits, gs)
    perm = rng.permutation(k).astype(np.int32)
    return q, s, z, perm


def _gelu(y):
    return 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y**3)))


@pytest.mark.parametrize("isa", ["native", "avx2", "portable"])
@pytest.mark.parametrize("bits", [4, 8])
def test_quant_linear_matches_float64_over_odd_shapes_isas_and_threads(isa, bits):
    rng = np.random.default_rng(bits)
    for n, k, gs in CASES:
        q, s, z, perm = _packed(rng, n, k, bits, gs)
        codes = gptq.unpack_codes(q, bits, k).astype(np.float64)
        g = np.arange(k) // gs
        w_perm = (codes - z.astype(np.float64)[:, g]) * s.astype(np.float64)[:, g]
        w = np.empty_like(w_perm)
        w[:, perm] = w_perm
        assert np.array_equal(w, gptq.dequantize_packed(q, s, z, perm, bits, gs))
        b = rng.standard_normal(n).astype(np.float16)
        bound_w = (np.abs(codes) + np.abs(z.astype(np.float64)[:, g])) * np.abs(s.astype(np.float64)[:, g])
        bound_w_orig = np.empty_like(bound_w)
        bound_w_orig[:, perm] = bound_w
        for m in (1, 3, 4, 17, 40, 70):
            x = rng.standard_normal((m, k)).astype(np.float32)
            for act in (None, "gelu_new"):
                want = x.astype(np.float64) @ w.T + b.astype(np.float64)
                tol = (k + 4) * U * (np.abs(x.astype(np.float64)) @ bound_w_orig.T + np.abs(b)) * 2 + 1e-30
                if act:
                    want, tol = _gelu(want), tol * 1.13 + 1e-6 * np.abs(want)
                for threads in (1, 2):
                    with kernels.configured(threads=threads, isa=isa):
                        got = kernels.quant_linear(jt.array(x), jt.array(perm), jt.array(q), jt.array(s), jt.array(z),
                                                   jt.array(b), bits=bits, group_size=gs, activation=act).numpy()
                    err = np.abs(got - want)
                    assert (err <= tol).all(), (isa, bits, n, k, gs, m, act, threads, float((err / tol).max()))


@pytest.mark.parametrize("bits", [4, 8])
def test_every_tail_and_group_element_counts(bits):
    """x nonzero at one position at a time: each code of each group (and the K tail) is read once."""
    rng = np.random.default_rng(7)
    # (41, 16): tails inside a vector; (75, 32): every position of int4's deinterleaved blocks of
    # 2 vectors (qdot4: 16 codes on AVX2, 32 on AVX-512) and the natural-order tail after them.
    for n, k, gs, positions in ((6, 41, 16, (0, 15, 16, 31, 32, 39, 40)), (5, 75, 32, range(75))):
        q, s, z, perm = _packed(rng, n, k, bits, gs)
        w = gptq.dequantize_packed(q, s, z, perm, bits, gs)
        for isa in ("native", "avx2", "portable"):
            for j in positions:
                x = np.zeros((1, k), np.float32)
                x[0, j] = 1.0
                with kernels.configured(isa=isa):
                    got = kernels.quant_linear(jt.array(x), jt.array(perm), jt.array(q), jt.array(s), jt.array(z),
                                               bits=bits, group_size=gs).numpy()
                np.testing.assert_allclose(got[0], w[:, j], rtol=1e-6, atol=1e-6, err_msg=f"{isa} k={k} j={j}")


def test_quantize_rows_round_trips_within_one_step():
    """Rounding the zero point shifts the grid by <= half a step, so a group's extremes may clip by
    up to one step; everything else is rounded to the nearest of the grid."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((9, 300)).astype(np.float32)
    for bits in (4, 8):
        q, s, z = gptq.quantize_rows(w, bits, 128)
        back = gptq.dequantize_packed(q, s, z, np.arange(300, dtype=np.int32), bits, 128)
        step = s.astype(np.float32)[:, np.arange(300) // 128]
        err = np.abs(back - w)
        assert (err <= step * (1 + 1e-3)).all()
        assert (err <= 0.5 * step * (1 + 1e-3)).mean() > 0.98


@pytest.mark.parametrize("bits", [4, 8])
def test_plain_jittor_fallback_gives_the_same_packed_linear(bits):
    """JittorOps.quant_linear (used where the CPU kernels are not) computes the same layer."""
    from jmoss.model import JittorOps

    rng = np.random.default_rng(11)
    n, k, gs = 37, 150, 64
    q, s, z, perm = _packed(rng, n, k, bits, gs)
    x = rng.standard_normal((3, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float16)
    args = (jt.array(x), jt.array(perm), jt.array(q), jt.array(s), jt.array(z), jt.array(b))
    plain = JittorOps(jt).quant_linear(*args, bits=bits, group_size=gs, activation="gelu_new").numpy()
    fused = kernels.quant_linear(*args, bits=bits, group_size=gs, activation="gelu_new").numpy()
    want = _gelu(x.astype(np.float64) @ gptq.dequantize_packed(q, s, z, perm, bits, gs).T.astype(np.float64) + b)
    np.testing.assert_allclose(plain, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fused, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("isa", ["native", "avx2", "portable"])
@pytest.mark.parametrize("bits", [4, 8])
def test_int8_compute_mode_stays_within_its_activation_rounding_bound(isa, bits):
    """quant_compute="int8": prefill (M >= 16) on AVX-512 VNNI rounds x per row to amax/127 steps, decode
    (M < 16) on AVX2/AVX-512 per block of 32 (a finer step), so |y - y_ref| <= (amax_m / 254) *
    sum_j |W[n, j]| plus fp32 rounding either way; group sizes outside a path's reach (prefill:
    GS % 4, decode: GS % 32) and the portable path give the fp32 result exactly (test_quant_q8.py
    checks the decode kernels against their own quantization). The measured prefill error is
    printed (pytest -s) as the mode's report."""
    rng = np.random.default_rng(100 + bits)
    vnni = isa == "native" and kernels.vnni_ready()
    with kernels.configured(isa=isa):
        q8 = kernels.q8_decode_ready()
    for n, k, gs in CASES + [(9, 61, 30)]:
        q, s, z, perm = _packed(rng, n, k, bits, gs)
        w = gptq.dequantize_packed(q, s, z, perm, bits, gs).astype(np.float64)
        b = rng.standard_normal(n).astype(np.float16)
        for m in (1, 3, 4, 17, 40, 70):
            x = rng.standard_normal((m, k)).astype(np.float32)
            x[0, 0] = 9.0  # one outlier sets row 0's step
            for act in (None, "gelu_new"):
                want = x.astype(np.float64) @ w.T + b.astype(np.float64)
                amax = np.abs(x.astype(np.float64)).max(axis=1, keepdims=True)
                tol = amax / 254 * np.abs(w).sum(axis=1) * (1 + 1e-3) + 1e-5 * (np.abs(x) @ np.abs(w).T + np.abs(b))
                if act:
                    want, tol = _gelu(want), tol * 1.13 + 1e-6 * np.abs(want)
                args = [jt.array(a) for a in (x, perm, q, s, z, b)]
                for threads in (1, 2):
                    with kernels.configured(threads=threads, isa=isa):
                        exact = kernels.quant_linear(*args, bits=bits, group_size=gs, activation=act).numpy()
                        with kernels.configured(quant_compute="int8"):
                            got = kernels.quant_linear(*args, bits=bits, group_size=gs, activation=act).numpy()
                    err = np.abs(got - want)
                    assert (err <= tol).all(), (isa, bits, n, k, gs, m, act, threads, float((err / tol).max()))
                    if vnni and m >= 16 and gs % 4 == 0 and k >= 100:  # (tiny K can round exactly)
                        assert not np.array_equal(got, exact)  # the int8 path was really taken
                        if act is None and threads == 1 and m == 40:
                            print(f"int8 compute, {bits}-bit N={n} K={k} G={gs}: max |err| / max |y| = "
                                  f"{err.max() / np.abs(want).max():.2e} (fp32 mode "
                                  f"{np.abs(exact - want).max() / np.abs(want).max():.2e})")
                    elif q8 and m < 16 and gs % 32 == 0:
                        assert k < 100 or not np.array_equal(got, exact)  # the AVX2 decode kernels were taken
                    elif not (vnni and m >= 16 and gs % 4 == 0):
                        assert np.array_equal(got, exact)


def test_int8_compute_mode_is_switched_by_the_environment_and_checked():
    with pytest.raises(JmossError, match="fp32 or int8"):
        with kernels.configured(quant_compute="int4"):
            pass
    env = dict(os.environ, JMOSS_KERNELS_QUANT_COMPUTE="int8")
    out = subprocess.run([sys.executable, "-c", "from jmoss import kernels; print(kernels.info()['quant_compute'])"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "int8", out.stderr[-500:]
    env["JMOSS_KERNELS_QUANT_COMPUTE"] = "bf16"
    out = subprocess.run([sys.executable, "-c", "from jmoss import kernels; kernels.info()"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "JMOSS_KERNELS_QUANT_COMPUTE" in out.stderr


@pytest.mark.parametrize("isa", ["native", "avx2"])
@pytest.mark.parametrize("wdtype", [np.float16, np.float32])
def test_int8_compute_mode_on_float_weights_stays_within_both_rounding_bounds(isa, wdtype):
    """quant_compute="int8" also takes fp16/fp32 weights (prefill, M >= 16, VNNI): each 12-row panel is
    rounded per row and group of 128 to amax_w/127 steps as it is made, x per row to amax_x/127, so
    |y - y_ref| <= amax_x/254 sum|W| + sum_j (|x_j| + amax_x/254) amax_w(j)/254 plus fp32 rounding;
    fewer rows and other ISA paths keep the exact fp32 result."""
    rng = np.random.default_rng(7)
    vnni = isa == "native" and kernels.vnni_ready()
    for n, k in ((1, 1), (13, 100), (50, 300), (29, 1031)):
        w = rng.standard_normal((n, k)).astype(wdtype)
        w[0, 0] = 6.0  # an outlier sets its group's step
        w64 = w.astype(np.float64)
        g = np.arange(k) // 128
        amax_w = np.stack([np.abs(w64[:, g == i]).max(axis=1) for i in range(g.max() + 1)], axis=1)[:, g]
        b = rng.standard_normal(n).astype(wdtype)
        for m in (1, 4, 17, 40, 70):
            x = rng.standard_normal((m, k)).astype(np.float32)
            x64 = x.astype(np.float64)
            want = x64 @ w64.T + b.astype(np.float64)
            amax_x = np.abs(x64).max(axis=1, keepdims=True)
            tol = (amax_x / 254 * np.abs(w64).sum(axis=1) + (np.abs(x64) + amax_x / 254) @ (amax_w / 254).T) * (1 + 1e-3)
            tol += 1e-5 * (np.abs(x64) @ np.abs(w64).T + np.abs(b))
            args = [jt.array(a) for a in (x, w, b)]
            with kernels.configured(isa=isa):
                exact = kernels.linear(*args).numpy()
                with kernels.configured(quant_compute="int8"):
                    got = kernels.linear(*args).numpy()
            err = np.abs(got - want)
            assert (err <= tol).all(), (isa, n, k, m, float((err / tol).max()))
            if vnni and m >= 16 and k >= 100:
                assert not np.array_equal(got, exact)  # the int8 path was really taken
                if m == 40:
                    print(f"int8 compute, {np.dtype(wdtype).name} weights N={n} K={k}: max |err| / max |y| = "
                          f"{err.max() / np.abs(want).max():.2e}")
            elif not (vnni and m >= 16):
                assert np.array_equal(got, exact)


@pytest.mark.parametrize("isa", ["native", "avx2", "portable"])
@pytest.mark.parametrize("bits", [4, 8])
def test_an_out_of_range_perm_gives_nan_never_a_read_outside_x(isa, bits):
    """A store's perms are checked before any kernel runs (jmoss.store_check); a perm that changed on
    disk after that check still never indexes outside x: the kernel's O(K) bound makes the output NaN.
    Every path: the GEMV (M < 16), the 12-row panels (M >= 16), the int8-compute mode."""
    rng = np.random.default_rng(bits)
    n, k, gs = 40, 96, 32
    q, s, z, perm = _packed(rng, n, k, bits, gs)
    for value in (k, k + 1, 2**31 - 1, -1, -(2**31), 40000):
        for at in (0, k // 2, k - 1):
            bad = perm.copy()
            bad[at] = value
            for m in (1, 5, 20):
                x = rng.standard_normal((m, k)).astype(np.float32)
                for compute in ("fp32", "int8"):
                    with kernels.configured(isa=isa, quant_compute=compute):
                        got = kernels.quant_linear(jt.array(x), jt.array(bad), jt.array(q), jt.array(s), jt.array(z),
                                                   bits=bits, group_size=gs).numpy()
                    assert np.isnan(got).all(), (value, at, m, compute)
    with pytest.raises(JmossError, match="group_size=0"):
        kernels.quant_linear(jt.array(np.ones((1, k), np.float32)), jt.array(perm), jt.array(q), jt.array(s),
                             jt.array(z), bits=bits, group_size=0)
