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
tiles of the 4x4 GEMM tile) and 64. Every case runs on the native ISA path and the portable path,
with 1 and 2 threads (the thread count is a per-call kernel argument, so one process covers both;
the environment variables are checked in subprocesses).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jmoss.errors import JmossError
from jmoss.jittor_setup import get_jittor
from jmoss import kernels

jt = get_jittor("cpu")

U = 2.0**-24
SHAPES_NK = [(1, 1), (7, 13), (5, 16), (33, 100), (67, 1000), (130, 1031), (19, 4099)]
MS = [1, 3, 17, 64]


def reference(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, activation: str | None) -> tuple[np.ndarray, np.ndarray]:
    """float64 result and its rigorous fp32-accumulation error bound."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    y = x64 @ w64.T
    scale = np.abs(x64) @ np.abs(w64).T
    if b is not None:
        y = y + b.astype(np.float64)
        scale = scale + np.abs(b.astype(np.float64))
    bound = (x.shape[-1] + 2) * U * scale
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


@pytest.mark.parametrize("isa", ["native", "portable"])
@pytest.mark.parametrize("wdtype", [np.float16, np.float32])
@pytest.mark.parametrize("bdtype", [None, np.float16, np.float32])
@pytest.mark.parametrize("activation", [None, "gelu_new"])
def test_linear_matches_float64_reference_over_odd_shapes_and_threads(isa, wdtype, bdtype, activation):
    rng = np.random.default_rng(hash((isa, str(wdtype), str(bdtype), activation)) % 2**32)
    for n, k in SHAPES_NK:
        w = rng.standard_normal((n, k)).astype(wdtype)
        b = rng.standard_normal(n).astype(bdtype) if bdtype is not None else None
        for m in MS:
            x = rng.standard_normal((m, k)).astype(np.float32)
            want, bound = reference(x, w, b, activation)
            for threads in (1, 2):
                with kernels.configured(threads=threads, isa=isa):
                    got = run(x, w, b, activation)
                check(got, want, bound, f"isa={isa} W={np.dtype(wdtype).name} M={m} N={n} K={k} threads={threads}")


@pytest.mark.parametrize("isa", ["native", "portable"])
@pytest.mark.parametrize("m", MS)
def test_every_k_tail_element_counts(isa, m):
    """x is zero except in the last K % 16 columns, so the result is only the scalar tail."""
    rng = np.random.default_rng(m)
    for k in (15, 17, 31, 1031, 4099):
        tail = k % 16 or 16
        x = np.zeros((m, k), np.float32)
        x[:, k - tail:] = rng.standard_normal((m, tail))
        w = rng.standard_normal((37, k)).astype(np.float16)
        want, bound = reference(x, w, None, None)
        with kernels.configured(isa=isa):
            check(run(x, w, None), want, bound, f"isa={isa} M={m} K={k}")


@pytest.mark.parametrize("isa", ["native", "portable"])
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


def test_native_and_portable_paths_agree_closely():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((17, 1031)).astype(np.float32)
    w = rng.standard_normal((130, 1031)).astype(np.float16)
    b = rng.standard_normal(130).astype(np.float16)
    with kernels.configured(isa="native"):
        native = run(x, w, b, "gelu_new")
    with kernels.configured(isa="portable"):
        portable = run(x, w, b, "gelu_new")
    assert kernels.isa_path("portable") == "portable"
    np.testing.assert_allclose(native, portable, rtol=2e-5, atol=2e-4)


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
    full_env = {k: v for k, v in os.environ.items() if k not in ("JMOSS_THREADS", "OMP_NUM_THREADS", "JMOSS_KERNELS_ISA")}
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
    for env in ({"JMOSS_THREADS": "lots"}, {"JMOSS_KERNELS_ISA": "sse9"}):
        proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0 and "JmossError" in proc.stderr, env
