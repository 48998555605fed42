"""The kernels' thread pool (kernels/cpu_kernels/pool.h): any schedule gives the same bits.

Chunks (32 weight rows of a GEMV, a GEMM panel, an attention head, a LayerNorm row) are claimed
dynamically from a shared counter, so which thread computes a chunk changes from run to run; what
a chunk computes must not. Every parallel op is run with the pool's dynamic schedule, the static
split OpenMP's schedule(static) would make, and "slow-worker" (dynamic, with every worker starting
each job late, so the caller takes most chunks and a late worker the rest), at 1, 2 and 3 threads
(3 > the cores of a 2-core CI machine: a descheduled member), on the native, AVX2 and portable
paths; every result must equal the 1-thread static one bit for bit. Shapes give every op more
chunks than threads. Accuracy against float64 is test_kernels.py's and test_quant_kernels.py's job.
"""

from __future__ import annotations

import numpy as np
import pytest

from jmoss import kernels
from jmoss.converters import gptq
from jmoss.jittor_setup import get_jittor

jt = get_jittor("cpu")
ISAS = ["native", "avx2", "portable"]
SCHEDULES = ["dynamic", "static", "slow-worker"]
THREADS = [1, 2, 3]


def _same_everywhere(isa: str, compute) -> None:
    """compute() (numpy arrays) under every schedule and thread count equals the 1-thread static run."""
    with kernels.configured(isa=isa, threads=1, schedule="static"):
        want = compute()
    for threads in THREADS:
        for schedule in SCHEDULES:
            with kernels.configured(isa=isa, threads=threads, schedule=schedule):
                got = compute()
            for g, w in zip(got, want):
                assert np.array_equal(g, w), (isa, threads, schedule, float(np.abs(g - w).max()))


@pytest.mark.parametrize("isa", ISAS)
def test_linear_is_bit_identical_under_every_schedule(isa):
    rng = np.random.default_rng(1)
    w = jt.array(rng.standard_normal((203, 150)).astype(np.float16))
    b = jt.array(rng.standard_normal(203).astype(np.float16))
    xs = [jt.array(rng.standard_normal((m, 150)).astype(np.float32)) for m in (1, 3, 40)]  # GEMV, tiles, GEMM

    def compute():
        return [kernels.linear(x, w, b, activation="gelu_new").numpy() for x in xs]

    _same_everywhere(isa, compute)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [4, 8])
def test_quant_linear_is_bit_identical_under_every_schedule(isa, bits):
    rng = np.random.default_rng(bits)
    q, s, z = gptq.quantize_rows(rng.standard_normal((203, 256)).astype(np.float32), bits, 32)
    parts = [jt.array(a) for a in (rng.permutation(256).astype(np.int32), q, s, z)]
    b = jt.array(rng.standard_normal(203).astype(np.float16))
    xs = [jt.array(rng.standard_normal((m, 256)).astype(np.float32)) for m in (1, 5, 20)]  # GEMV, panels, GEMM
    computes = ["fp32", "int8"] if kernels.vnni_ready() else ["fp32"]  # int8 activations: VNNI CPUs only

    def compute():
        out = []
        for mode in computes:
            with kernels.configured(quant_compute=mode):
                out += [kernels.quant_linear(x, *parts, b, bits=bits, group_size=32, activation="gelu_new").numpy()
                        for x in xs]
        return out

    _same_everywhere(isa, compute)


@pytest.mark.parametrize("isa", ISAS)
def test_layer_norm_and_attention_are_bit_identical_under_every_schedule(isa):
    rng = np.random.default_rng(3)
    x = jt.array(rng.standard_normal((10, 96)).astype(np.float32))  # >= 8 rows: the parallel path
    lw, lb = (jt.array(rng.standard_normal(96).astype(np.float16)) for _ in range(2))
    batch, heads, dim, length, start, max_len = 1, 8, 64, 4, 36, 48  # 32 jobs over 40 keys: parallel
    qkv = rng.standard_normal((batch, length, 3 * heads * dim)).astype(np.float32)
    cache = rng.standard_normal((2, batch, heads, max_len, dim)).astype(np.float32)
    angles = rng.standard_normal((batch, length, 1, 8)).astype(np.float32)
    mask = np.zeros((batch, 1, length, start + length), np.float32)
    mask[..., start + 1:] = -3.4028235e38  # float32's minimum, the causal mask value

    def compute():
        keys, values = jt.array(cache[0]), jt.array(cache[1])
        ctx = kernels.attention(jt.array(qkv), keys, values, jt.array(np.sin(angles)), jt.array(np.cos(angles)),
                                jt.array(mask), start, 16)
        return [kernels.layer_norm(x, lw, lb, 1e-5).numpy(), ctx.numpy()]

    _same_everywhere(isa, compute)


@pytest.mark.parametrize("isa", ISAS)
def test_decode_block_is_bit_identical_under_every_schedule(isa):
    rng = np.random.default_rng(4)
    d, heads, f, max_len, start = 128, 4, 512, 16, 5
    half = lambda *shape: jt.array((0.1 * rng.standard_normal(shape)).astype(np.float16))  # noqa: E731
    w = {"ln_1.weight": half(d), "ln_1.bias": half(d), "attn.qkv.weight": half(3 * d, d),
         "attn.out_proj.weight": half(d, d), "mlp.fc_in.weight": half(f, d), "mlp.fc_in.bias": half(f),
         "mlp.fc_out.weight": half(d, f), "mlp.fc_out.bias": half(d)}
    h = rng.standard_normal((2, 1, d)).astype(np.float32)
    cache = rng.standard_normal((2, 2, heads, max_len, d // heads)).astype(np.float32)
    angles = rng.standard_normal((2, 1, 1, 8)).astype(np.float32)
    mask = np.zeros((2, 1, 1, start + 1), np.float32)

    def compute():
        keys, values = jt.array(cache[0]), jt.array(cache[1])
        y = kernels.decode_block(jt.array(h), w, keys, values, jt.array(np.sin(angles)), jt.array(np.cos(angles)),
                                 jt.array(mask), start, eps=1e-5, rotary_dim=16)
        return [y.numpy(), keys.numpy(), values.numpy()]

    _same_everywhere(isa, compute)


def test_many_back_to_back_jobs_neither_hang_nor_mix():
    """Jobs microseconds apart (a decode step's rhythm) with workers joining late or not at all."""
    rng = np.random.default_rng(5)
    w = jt.array(rng.standard_normal((96, 64)).astype(np.float16))
    xs = [jt.array(rng.standard_normal((1, 64)).astype(np.float32)) for _ in range(8)]
    with kernels.configured(threads=1):
        want = [kernels.linear(x, w).numpy() for x in xs]
    for schedule in ("dynamic", "slow-worker"):
        with kernels.configured(threads=3, schedule=schedule):
            for _ in range(25):
                got = [kernels.linear(x, w) for x in xs]
                jt.sync(got)
                assert all(np.array_equal(g.numpy(), v) for g, v in zip(got, want)), schedule


def test_pool_threads_really_run_at_once():
    assert kernels.threads_used(1) == 1
    assert kernels.threads_used(3) == 3  # more threads than a 2-core machine has cores: still 3
    with pytest.raises(Exception, match="schedule"):
        with kernels.configured(schedule="guided"):
            pass
