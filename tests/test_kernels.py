"""jmoss.kernels.linear against float64 numpy references.

Tolerance, and why: the kernels widen fp16 weights to fp32 exactly and accumulate in fp32, so
the only rounding is in the K products and sums. For any summation order the classic bound is
|y - y_ref| <= (K + 2) * u * sum_k |x_k * w_k| (+ |b|), with u = 2^-24 (Higham, Accuracy and
Stability, §3.1). gelu_new then adds a few ulps of expf/division and scales the incoming error by
at most |gelu'| < 1.13. The bound is rigorous, so a failure is a bug, not noise; tests whose x is
nonzero only in the K tail keep the bound tiny, so a dropped or doubled tail element cannot hide
under it.

Shapes are chosen against the kernels' structure: N and K not multiples of 4/8/16/32 (register
tile, AVX2 and AVX-512 widths, chunking), K below one vector, M = 1 (GEMV), 3 and 17 (remainder
tiles of the 4x4 dot-product tile, also taken below 32 rows; M = 40 and 64 take the
outer-product GEMM: 40 a full block of x rows and a short one, 64 at K = 4099 two x^T slabs; the
packed-weight tests cover partial 2-vector blocks of the same GEMM) and N not multiples of its
12- (AVX-512) or 6-row (AVX2) weight panels. Every case runs on the native
ISA path, the AVX2 path (forced with isa="avx2", also on an AVX-512 CPU) and the portable path,
with 1 and 2 threads (the thread count is a per-call kernel argument, so one process covers both;
the environment variables are checked in subprocesses).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

from jmoss.errors import JmossError
from jmoss.jittor_setup import get_jittor
from jmoss import kernels

jt = get_jittor("cpu")

U = 2.0**-24
SHAPES_NK = [(1, 1), (7, 13), (5, 16), (33, 100), (67, 1000), (130, 1031), (19, 4099)]
MS = [1, 3, 5, 17, 40, 64]


# The AMX prefill path ("bf16x3", M >= kernels.cpu.AMX_MIN_M on the native ISA where the CPU has
# AMX-BF16). Each operand v splits as v = vh + vl + e (bf16 halves, half-ulp rounding): |vl| <= 2^-8|v|
# and |e| <= 2^-16|v| (e = 0 for fp16 weights, whose 11 bits fit two bf16s). The kernel computes
# wh*xh + wl*xh + wh*xl exactly in the tiles, so each product's error is wl*xl + (wh+wl)*ex + ew*x:
# <= 3 * 2^-16 |w x| (with slack for the (1 + 2^-8) factors), and the fp32 accumulation now sums 3K
# exact products, each rounding bounded by U times the running sum of |terms| (<= 1.01 |w||x|).
AMX_REL = 3.1 * 2.0**-16


def seed(*parts: object) -> int:
    """A per-case seed that is the same in every process (hash() of a str is salted per process)."""
    return zlib.crc32(repr(parts).encode())


def amx_taken(isa: str, m: int) -> bool:
    return isa == "native" and m >= kernels.cpu.AMX_MIN_M and kernels.cpu._amx() and kernels.amx_ready()


def reference(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, activation: str | None,
              amx: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """float64 result and its rigorous fp32-accumulation error bound (+ the bf16x3 term if amx)."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    y = x64 @ w64.T
    prod = np.abs(x64) @ np.abs(w64).T
    scale = prod
    if b is not None:
        y = y + b.astype(np.float64)
        scale = scale + np.abs(b.astype(np.float64))
    k = x.shape[-1]
    bound = (3 * k + 2) * U * 1.01 * scale + AMX_REL * prod if amx else (k + 2) * U * scale
    if activation == "gelu_new":
        pre = y
        y = 0.5 * pre * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (pre + 0.044715 * pre**3)))
        bound = 1.13 * bound + 16 * U * (np.abs(pre) + np.abs(y))
    return y, bound + 1e-30


def run(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, activation: str | None = None) -> np.ndarray:
    bias = jt.array(b) if b is not None else None
    return kernels.linear(jt.array(x), jt.array(w), bias, activation=activation).numpy()


def check(got: np.ndarray, want: np.ndarray, bound: np.ndarray, what: str) -> None:
    assert got.dtype == np.float32 and got.shape == want.shape, what
    err = np.abs(got.astype(np.float64) - want)
    worst = np.unravel_index(np.argmax(err / bound), err.shape)
    assert np.all(err <= bound), f"{what}: |err| {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"


@pytest.mark.parametrize("isa", ["native", "avx2", "portable"])
@pytest.mark.parametrize("wdtype", [np.float16, np.float32])
@pytest.mark.parametrize("bdtype", [None, np.float16, np.float32])
@pytest.mark.parametrize("activation", [None, "gelu_new"])
def test_linear_matches_float64_reference_over_odd_shapes_and_threads(isa, wdtype, bdtype, activation):
    rng = np.random.default_rng(seed(isa, str(wdtype), str(bdtype), activation))
    for n, k in SHAPES_NK:
        w = rng.standard_normal((n, k)).astype(wdtype)
        b = rng.standard_normal(n).astype(bdtype) if bdtype is not None else None
        for m in MS:
            x = rng.standard_normal((m, k)).astype(np.float32)
            want, bound = reference(x, w, b, activation, amx=amx_taken(isa, m))
            for threads in (1, 2):
                with kernels.configured(threads=threads, isa=isa):
                    got = run(x, w, b, activation)
                check(got, want, bound, f"isa={isa} W={np.dtype(wdtype).name} M={m} N={n} K={k} threads={threads}")


@pytest.mark.parametrize("isa", ["native", "avx2", "portable"])
@pytest.mark.parametrize("m", MS)
def test_every_k_tail_element_counts(isa, m):
    """x is zero except in the last K % 16 columns, so the result is only the scalar tail."""
    rng = np.random.default_rng(m)
    for k in (15, 17, 31, 1031, 4099):
        tail = k % 16 or 16
        x = np.zeros((m, k), np.float32)
        x[:, k - tail:] = rng.standard_normal((m, tail))
        w = rng.standard_normal((37, k)).astype(np.float16)
        want, bound = reference(x, w, None, None, amx=amx_taken(isa, m))
        with kernels.configured(isa=isa):
            check(run(x, w, None), want, bound, f"isa={isa} M={m} K={k}")


@pytest.mark.parametrize("isa", ["native", "avx2", "portable"])
def test_gelu_new_saturates_without_nan_for_large_inputs(isa):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((5, 300)) * 40).astype(np.float32)
    w = rng.standard_normal((23, 300)).astype(np.float16)
    want, bound = reference(x, w, None, "gelu_new")
    assert np.abs(want).max() > 500  # the tanh saturates both ways here
    with kernels.configured(isa=isa):
        got = run(x, w, None, "gelu_new")
    assert np.isfinite(got).all()
    check(got, want, bound, f"isa={isa} large inputs")


def test_avx2_path_is_really_forced_on_an_avx2_cpu():
    flags = set()
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    want = "avx2+f16c" if {"avx2", "fma", "f16c"} <= flags else "portable"
    assert kernels.isa_path("avx2") == want
    with kernels.configured(isa="avx2"):
        assert kernels.info()["isa"] == want


def test_native_and_portable_paths_agree_closely():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((17, 1031)).astype(np.float32)
    w = rng.standard_normal((130, 1031)).astype(np.float16)
    b = rng.standard_normal(130).astype(np.float16)
    with kernels.configured(isa="native", amx=False):
        native = run(x, w, b, "gelu_new")
    with kernels.configured(isa="portable"):
        portable = run(x, w, b, "gelu_new")
    assert kernels.isa_path("portable") == "portable"
    np.testing.assert_allclose(native, portable, rtol=2e-5, atol=2e-4)
    with kernels.configured(isa="native", amx=True):
        amx = run(x, w, b, "gelu_new")
    np.testing.assert_allclose(amx, portable, rtol=1e-4, atol=2e-3)  # bf16x3: <= 3 * 2^-16 per product


AMX_SHAPES_NK = [(1, 1), (15, 33), (17, 31), (33, 100), (130, 1031), (47, 4099), (1024, 64)]
AMX_MS = [7, 8, 15, 16, 17, 31, 64, 65, 70]


@pytest.mark.skipif(not kernels.amx_ready(), reason="no AMX-BF16 on this CPU/kernel: the fp32 paths cover it")
@pytest.mark.parametrize("wdtype", [np.float16, np.float32])
@pytest.mark.parametrize("activation", [None, "gelu_new"])
def test_amx_prefill_matches_float64_over_odd_shapes_and_threads(wdtype, activation):
    """The AMX bf16x3 GEMM: M around the 16-row tiles and the 4-tile groups (64), N not a multiple
    of the 16-row W panel, K not a multiple of 32 (zero-padded tiles) or of 16 (scalar tail split),
    against float64 within the bf16x3 bound (AMX_REL), on 1 and 2 threads; and it must agree
    with the fp32 path (amx=False) within the same bound."""
    rng = np.random.default_rng(11 if wdtype == np.float16 else 12)
    for n, k in AMX_SHAPES_NK:
        w = rng.standard_normal((n, k)).astype(wdtype)
        b = rng.standard_normal(n).astype(np.float16)
        for m in AMX_MS:
            x = rng.standard_normal((m, k)).astype(np.float32)
            want, bound = reference(x, w, b, activation, amx=m >= kernels.cpu.AMX_MIN_M)
            for threads in (1, 2):
                with kernels.configured(threads=threads, isa="native", amx=True):
                    got = run(x, w, b, activation)
                check(got, want, bound, f"amx W={np.dtype(wdtype).name} M={m} N={n} K={k} threads={threads}")
            with kernels.configured(isa="native", amx=False):
                fp32 = run(x, w, b, activation)
            check(fp32, want, reference(x, w, b, activation)[1], f"fp32 path M={m} N={n} K={k}")


@pytest.mark.skipif(not kernels.amx_ready(), reason="no AMX-BF16 on this CPU/kernel")
def test_amx_long_prompts_run_in_row_slabs():
    """M beyond one slab of packed x (64 rows at K = 4099, 256 at K = 1000): slab edges and a short
    last slab (200 = 3 x 64 + 8) give the same bound as one call."""
    rng = np.random.default_rng(13)
    for m, n, k in [(200, 47, 4099), (530, 33, 1000)]:
        w = rng.standard_normal((n, k)).astype(np.float16)
        b = rng.standard_normal(n).astype(np.float16)
        x = rng.standard_normal((m, k)).astype(np.float32)
        want, bound = reference(x, w, b, "gelu_new", amx=True)
        for threads in (1, 2):
            with kernels.configured(threads=threads, isa="native", amx=True):
                check(run(x, w, b, "gelu_new"), want, bound, f"amx slabs M={m} N={n} K={k} threads={threads}")


@pytest.mark.skipif(not kernels.amx_ready(), reason="no AMX-BF16 on this CPU/kernel")
def test_amx_path_is_really_taken_and_can_be_switched_off():
    """bf16x3 rounds differently from fp32 FMAs: with AMX on the result differs from amx=False
    in low bits for M >= AMX_MIN_M and is bit-identical below it (decode stays on the GEMV)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 1024)).astype(np.float32)
    w = rng.standard_normal((96, 1024)).astype(np.float16)
    with kernels.configured(amx=True):
        on, on1 = run(x, w, None), run(x[:1], w, None)
    with kernels.configured(amx=False):
        off, off1 = run(x, w, None), run(x[:1], w, None)
    assert not np.array_equal(on, off)
    np.testing.assert_array_equal(on1, off1)
    assert kernels.info()["amx_prefill"] is True and kernels.amx_prefill()
    with kernels.configured(amx=False):
        assert not kernels.amx_prefill()
    with kernels.configured(isa="portable"):
        assert not kernels.amx_prefill()
    assert _info_in_subprocess({"JMOSS_KERNELS_AMX": "0"})["amx_prefill"] is False


def test_leading_dimensions_are_kept_and_fp16_activations_are_widened():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 40)).astype(np.float16)
    w = rng.standard_normal((9, 40)).astype(np.float16)
    got = kernels.linear(jt.array(x), jt.array(w)).numpy()
    want, bound = reference(x.astype(np.float32).reshape(6, 40), w, None, None)
    assert got.shape == (2, 3, 9)
    check(got.reshape(6, 9), want, bound, "leading dims")


def test_two_threads_really_run_in_parallel_regions():
    assert kernels.threads_used(1) == 1
    assert kernels.threads_used(2) == 2


def test_fp16_weights_are_read_in_place_not_widened_into_a_copy():
    """A 64 MiB fp16 weight would need 128 MiB more as an fp32 copy; RSS must not grow by that.

    Jittor's caching allocator keeps freed blocks, so a temporary widened copy made inside an op
    would still show in RSS after it; the outputs here are at most 2 MiB.
    """
    rng = np.random.default_rng(5)
    w = jt.array(rng.standard_normal((8192, 4096), dtype=np.float32).astype(np.float16))
    x1 = jt.array(rng.standard_normal((1, 4096), dtype=np.float32))
    x64 = jt.array(rng.standard_normal((64, 4096), dtype=np.float32))
    jt.sync([w, x1, x64])
    kernels.linear(x1, w).sync()  # compile and warm the allocator
    before = _rss_mib()
    for _ in range(3):
        kernels.linear(x1, w).sync()
    kernels.linear(x64, w).sync()
    assert _rss_mib() - before < 32, "linear() grew the process by more than its outputs"


def test_the_read_probe_reads_numpy_memory_where_it_lies(monkeypatch):
    """The probe is the bound decode is judged by, so it must read pages like the resident weights'
    (numpy's large arrays are advised 2 MiB pages), lent to jittor without a copy: a copy into
    jittor's allocator lands in 4 KiB pages and read ~25% slower on a KVM guest, a bound the
    weights then beat."""
    import jmoss.jittor_setup as setup

    lent = []
    real = setup.wrap_zero_copy
    monkeypatch.setattr(setup, "wrap_zero_copy", lambda jt_, array: lent.append(array) or real(jt_, array))
    gbps = kernels.memory_read_probe(8 << 20, repeats=1, threads=1)
    assert np.isfinite(gbps) and gbps > 0
    assert [a.nbytes for a in lent] == [8 << 20]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda: kernels.linear(jt.ones((2, 5)), jt.ones((3, 4), "float16")), "does not match"),
        (lambda: kernels.linear(jt.ones((2, 4)), jt.ones((3, 4, 1), "float16")), "2-D"),
        (lambda: kernels.linear(jt.ones((2, 4)), jt.ones((3, 4), "int32")), "not supported"),
        (lambda: kernels.linear(jt.ones((2, 4)), jt.ones((3, 4), "float16"), jt.ones((4,))), "bias"),
        (lambda: kernels.linear(jt.ones((2, 4)), jt.ones((3, 4), "float16"), activation="relu"), "activation"),
    ],
)
def test_bad_inputs_raise_jmoss_errors(bad, message):
    with pytest.raises(JmossError, match=message):
        bad()


def test_available_and_info_describe_the_path_taken():
    assert kernels.available()
    info = kernels.info()
    assert info["isa"] in ("avx512", "avx2+f16c", "portable")
    flags = set(info["cpu_features"])
    if {"avx512f"} <= flags:
        assert info["isa"] == "avx512"
    elif {"avx2", "fma", "f16c"} <= flags:
        assert info["isa"] == "avx2+f16c"
    assert info["threads"] >= 1 and info["threads_used"] == info["threads"]


def _info_in_subprocess(env: dict[str, str]) -> dict:
    code = "import json; from jmoss import kernels; print('INFO' + json.dumps(kernels.info()))"
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("JMOSS_THREADS", "OMP_NUM_THREADS", "JMOSS_KERNELS_ISA", "JMOSS_KERNELS_AMX")}
    full_env.update(env)
    proc = subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("INFO"))
    return json.loads(line[4:])


def test_thread_count_and_isa_come_from_the_environment():
    default = _info_in_subprocess({})
    assert default["threads"] == len(os.sched_getaffinity(0))
    assert _info_in_subprocess({"OMP_NUM_THREADS": "1"})["threads"] == 1
    pinned = _info_in_subprocess({"OMP_NUM_THREADS": "1", "JMOSS_THREADS": "3"})
    assert pinned["threads"] == 3 and pinned["threads_used"] == 3  # JMOSS_THREADS wins
    assert _info_in_subprocess({"JMOSS_KERNELS_ISA": "portable"})["isa"] == "portable"


def test_bad_environment_values_raise_jmoss_errors():
    code = "from jmoss import kernels; kernels.info()"
    for env in ({"JMOSS_THREADS": "lots"}, {"JMOSS_KERNELS_ISA": "sse9"}, {"JMOSS_KERNELS_AMX": "maybe"}):
        proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0 and "JmossError" in proc.stderr, env


# ------------------------------------------------------------------ fused LayerNorm and attention

MASK = float(np.finfo(np.float32).min)


@pytest.mark.parametrize("isa", ["native", "avx2", "portable"])
@pytest.mark.parametrize("pdtype", [np.float16, np.float32])
def test_layer_norm_matches_float64_reference_over_odd_shapes(isa, pdtype):
    rng = np.random.default_rng(11)
    for shape in [(1, 1024), (1, 7), (3, 5, 33), (17, 1031)]:
        x = (rng.standard_normal(shape) * 3 + 1.5).astype(np.float32)  # an offset mean: E[x^2]-E[x]^2 would lose it
        w = (1 + 0.1 * rng.standard_normal(shape[-1])).astype(pdtype)
        b = (0.1 * rng.standard_normal(shape[-1])).astype(pdtype)
        x64 = x.astype(np.float64)
        centred = x64 - x64.mean(-1, keepdims=True)
        want = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-5) * w.astype(np.float64) + b.astype(np.float64)
        for threads in (1, 2):
            with kernels.configured(threads=threads, isa=isa):
                got = kernels.layer_norm(jt.array(x), jt.array(w), jt.array(b), 1e-5).numpy()
            assert got.dtype == np.float32 and got.shape == shape
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=f"{shape} threads={threads}")


def reference_attention(qkv, keys, values, sin, cos, bias, start, rotary):
    """float64 numpy transcription of the model's attention: rotate pairs, write the cache, softmax."""
    b, t, width = qkv.shape
    _, heads, max_len, dim = keys.shape
    d = width // 3
    q, k, v = (qkv[:, :, i * d:(i + 1) * d].astype(np.float64).reshape(b, t, heads, dim) for i in range(3))

    def rotate(x):
        out = x.copy()
        s, c = sin.astype(np.float64), cos.astype(np.float64)  # [B, T, 1, R/2]
        even, odd = x[..., 0:rotary:2], x[..., 1:rotary:2]
        out[..., 0:rotary:2] = even * c - odd * s
        out[..., 1:rotary:2] = odd * c + even * s
        return out

    q, k = rotate(q), rotate(k)
    keys, values = keys.astype(np.float64).copy(), values.astype(np.float64).copy()
    end = start + t
    keys[:, :, start:end] = k.transpose(0, 2, 1, 3)
    values[:, :, start:end] = v.transpose(0, 2, 1, 3)
    scores = np.einsum("bthe,bhse->bhts", q, keys[:, :, :end]) / np.sqrt(dim) + bias.astype(np.float64)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = np.einsum("bhts,bhse->bthe", probs, values[:, :, :end]).reshape(b, t, d)
    return context, keys, values


@pytest.mark.parametrize("isa", ["native", "avx2", "portable"])
@pytest.mark.parametrize(
    "batch, heads, dim, rotary, start, length, max_len",
    [
        (1, 16, 64, 32, 40, 1, 64),  # CodeGen-350M decode step
        (2, 3, 10, 4, 5, 3, 11),  # odd head dim, partial rotary, prefill after cached tokens
        (1, 2, 8, 8, 0, 7, 7),  # full rotary, prefill from empty, cache exactly full
        (1, 1, 8, 2, 4200, 1, 4203),  # more keys than the kernel's stack scratch (4096)
        # Vector paths: 16-key blocks with a tail, head dims with a 16-lane tail, causal prefills whose
        # upper blocks are fully masked (skipped), a left-padded batch row.
        (1, 4, 72, 32, 0, 40, 48),
        (2, 2, 20, 8, 19, 21, 45),
        (1, 2, 64, 32, 0, 100, 100),
    ],
)
def test_attention_matches_float64_reference_and_writes_the_cache(isa, batch, heads, dim, rotary, start, length, max_len):
    rng = np.random.default_rng(start + length)
    width = 3 * heads * dim
    qkv = rng.standard_normal((batch, length, width)).astype(np.float32)
    keys = rng.standard_normal((batch, heads, max_len, dim)).astype(np.float32)  # slots past `start` are junk
    values = rng.standard_normal((batch, heads, max_len, dim)).astype(np.float32)
    angles = rng.uniform(0, 2 * np.pi, (batch, length, 1, rotary // 2))
    sin, cos = np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)
    total = start + length
    allowed = np.tril(np.ones((length, total), bool), k=start)[None].repeat(batch, 0)
    allowed[-1, :, : min(2, start)] = False  # the last row is left-padded: its first keys are hidden
    bias = np.where(allowed, 0.0, MASK).astype(np.float32)[:, None]
    want, want_keys, want_values = reference_attention(qkv, keys, values, sin, cos, bias, start, rotary)
    for threads in (1, 2):
        k_var, v_var = jt.array(keys), jt.array(values)
        with kernels.configured(threads=threads, isa=isa):
            got = kernels.attention(jt.array(qkv), k_var, v_var, jt.array(sin), jt.array(cos), jt.array(bias),
                                    start, rotary).numpy()
        assert got.dtype == np.float32 and got.shape == (batch, length, heads * dim)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"threads={threads}")
        np.testing.assert_allclose(k_var.numpy(), want_keys, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(v_var.numpy(), want_values.astype(np.float32))


def test_attention_rejects_mismatched_cache():
    qkv = jt.ones((1, 1, 3 * 2 * 8))
    with pytest.raises(JmossError, match="disagree"):
        kernels.attention(qkv, jt.zeros((1, 3, 4, 8)), jt.zeros((1, 3, 4, 8)), jt.ones((1, 1, 1, 2)),
                          jt.ones((1, 1, 1, 2)), jt.zeros((1, 1, 1, 1)), 0, 4)


def test_the_kernel_header_is_included_from_a_file_named_by_its_hash(tmp_path, monkeypatch):
    """jittor puts a jt.code op's header into the key it builds on every run of the op: the ~136 KB
    text goes in as one #include line of a file whose name is the text's hash (kernels.cpu)."""
    from pathlib import Path

    from jmoss.kernels import cpu

    live = cpu._header("avx2")  # what every op gets (before JMOSS_HOME moves below)
    assert live.startswith("#define JMOSS_FORCE_AVX2 1\n#include ") and live.count("\n") == 2
    assert Path(live.split('"')[1]).read_text().startswith("// ---- cpu_kernels/simd.h")
    monkeypatch.setenv("JMOSS_HOME", str(tmp_path / "home"))
    line = cpu._header_include("int x;\n")
    path = Path(line.split('"')[1])
    assert line == f'#include "{path}"\n' and path.parent == tmp_path / "home" / "kernels"
    assert path.read_text() == "int x;\n"
    assert cpu._header_include("int y;\n") != line  # another text: another file, another key, another kernel
    path.write_text("int z;\n")  # a file that no longer holds its text is written again
    assert cpu._header_include("int x;\n") == line and path.read_text() == "int x;\n"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary file left
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("JMOSS_HOME", str(tmp_path / "file" / "home"))  # cannot be created: the text itself
    assert cpu._header_include("int x;\n") is None
    monkeypatch.setenv("JMOSS_HOME", str(tmp_path / 'quote"d'))  # not writable in a C string literal
    assert cpu._header_include("int x;\n") is None
