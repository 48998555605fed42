"""Fused fp16-weight linear layers for the CPU, run through Jittor's ``jt.code`` custom op.

Jittor's own CPU matmul is single-threaded without oneDNN and moves fp16 weights at 0.2-1 GB/s
(jittor-notes §5); batch-1 decoding is a stream of GEMVs, so the speed of a CPU token is the speed
at which the weights are read. The C++ in ``cpu_kernels/`` (one file per op family, listed in its
README) reads fp16 (or fp32) weights in their stored ``[N, K]`` layout, widens them in registers
(F16C/AVX2 or AVX-512) and accumulates in fp32 on every core, with bias and gelu_new fused into the
same pass. No fp32 copy of a weight is ever made and nothing is allocated per call except the
output Var.

Public API (what ``jmoss.model`` codes against)::

    quant_linear(x, perm, qweight, scales, zeros, bias=None, *, bits, group_size, activation=None)
        the same for a packed int8/int4 weight of store format 2 (see quant_linear)
    linear(x, weight, bias=None, *, activation=None) -> jt.Var
        x       float32 [..., K] (fp16 is accepted and widened first)
        weight  float16 or float32 [N, K]   (torch layout: row n produces output n)
        bias    float16 or float32 [N] or None
        activation None or "gelu_new": 0.5*y*(1+tanh(sqrt(2/pi)*(y+0.044715*y^3))) after the bias
        returns float32 [..., N]
    layer_norm(x, weight, bias, eps) -> jt.Var
        x float32 [..., D]; weight, bias float16 or float32 [D]; returns float32 [..., D]
    attention(qkv, keys, values, sin, cos, attn_bias, start, rotary_dim) -> jt.Var
        one decoder layer's attention after the qkv projection, for the model's ops interface:
        qkv float32 [B, T, 3*H*Dh] ([q heads | k heads | v heads]); keys/values the layer's
        float32 static cache [B, H, L, Dh], written at slots [start, start+T); sin/cos float32
        [B, T, 1, R/2]; attn_bias float32 [B, 1, T, start+T]; returns float32 [B, T, H*Dh]
    decode_block(h, w, keys, values, sin, cos, attn_bias, start, *, eps, rotary_dim, bits=0, group_size=0)
        a whole decoder layer (fp16 or packed weights) as one op for B*T <= FUSED_MAX_ROWS rows, the
        same kernels in the same order as the per-op path; None where it does not apply
    available() -> bool     the kernels compile and give right answers on this CPU
    amx_ready() -> bool     the AMX-BF16 prefill GEMM is compiled in and Linux grants the tile state
    amx_prefill() -> bool   prefill GEMMs take that path now (amx_ready, switched on, native ISA)
    info() -> dict          {"isa": "avx512"|"avx2+f16c"|"portable", "threads": int, ...}
    configured(threads=None, isa=None, amx=None)   context manager overriding them for a block

Prefill (M >= AMX_MIN_M rows) on CPUs with AMX-BF16 runs a "bf16x3" tile GEMM: every operand is
split into two bf16 halves (fp16 weights exactly, fp32 activations to 2^-16), and three tile
products wh*xh + wl*xh + wh*xl are accumulated in fp32. Each product is off by at most 2 * 2^-16
of |w x| for fp16 weights (3 * 2^-16 for fp32 ones) -- fp32-class results (measured ~4e-6 of
max|y| at K = 1024-4096, against 5e-4 for fp16 compute), about 2x the fp32-FMA GEMM on one core.
The fp16 -> bf16 split of each 16- or 32-row weight panel is done between the tile products of the
previous one, so weights stay fp16 in memory. ``JMOSS_KERNELS_AMX=0`` (or ``configured(amx=False)``)
keeps every M on the fp32 AVX-512 kernels; without AMX (or if the kernel refuses the tile state)
they run anyway.

Packed int8/int4 weights (store format 2, ``quant_linear``): decode dequantizes in registers inside
the dot product (int8: codes widened with vpmovzxbd/vcvtdq2ps straight into the FMAs, one FMA by
the group's scale per group, the zero-point term from per-group sums of x; int4 on AVX-512: each
nibble looked up with vpermps in a 16-entry table of the group's exact (c - z) * s, x handed over
deinterleaved so no nibble is shuffled into place), so a token reads 1 or 0.5 byte per weight and
no dequantized copy exists; prefill (M >= 16) dequantizes a 12-row panel (6 on
AVX2) per thread into fp32 and runs the outer-product fp32 GEMM over it (not the AMX path).
``quant_compute="int8"`` (``JMOSS_KERNELS_QUANT_COMPUTE=int8``) is an opt-in, approximate prefill
mode on AVX-512 VNNI, what CTranslate2's int8 modes do: x is rounded per row to max|x|/127 steps
and the integer products run on vpdpbusd (~2.5-3x the fp32 GEMM per core); each activation is
then off by up to max|x_row|/254, measured ~1e-2 of max|y| on random layers (tests/
test_quant_kernels.py prints it), far from the 1e-4 fidelity of the default fp32 mode. Packed
weights keep their codes; fp16/fp32 weights are rounded too, per row and group of 128 to
max|w|/127 steps, one 12-row panel at a time (never a quantized copy of the layer).
The same mode covers packed decode and small M (M < 16: decode steps, lookup's verify passes) on
AVX2 and AVX-512 builds (``q8_decode_ready()``, cpu_kernels/quant_q8.h): x is rounded per row and
block of 32 permuted positions to max|x_block|/127 steps (a finer step than per row: activation
outliers coarsen only their own block), the products run on vpmaddubsw/vpmaddwd (on AVX-512 VNNI:
vpdpbusd, two weight rows per zmm) and one unpacked weight vector serves up to 8 x rows, so the
pass is no longer compute-bound on the fp32 widening
(needs group sizes that are multiples of 32; others keep the fp32 GEMV). Measured ~1.5e-2 of
max|logit| on random packed CodeGen/MOSS-shaped stores (benchmarks/accuracy_q8.py).

Prefill without AMX (M >= 32 rows for fp16/fp32 weights, >= 16 for packed ones; fewer rows keep
the dot-product tiles, which win there; AVX-512 or AVX2): each thread turns
12 (AVX2: 6) rows of W into an fp32 panel and sweeps 2-vector blocks of x rows, packed transposed,
past it: per k, 2 vector loads and 12 broadcasts feed 24 FMAs held in registers (~80-90 GFLOP/s
per Zen 4 core, ~75% of its FMA peak, against ~40-60 for the old 4x4 dot-product tile on packed
weights); bias and gelu_new are applied to the accumulators.

Threads: a model's own count (``jmoss.load(threads=)``, ``--threads``), else ``JMOSS_THREADS``, else
``OMP_NUM_THREADS``, else the CPUs this process may run on (``os.sched_getaffinity``). Every
parallel loop runs on one process-wide pool (``cpu_kernels/pool.h``): work is split into chunks
(32 weight rows of a GEMV, a GEMM panel, an attention head) claimed one by one from a shared
counter, the calling thread included, and a job ends when its chunks are done, so a thread the OS
has descheduled (a busy desktop) holds back only the chunk it is on; idle and waiting threads spin
briefly, then sleep on a futex and give the core up. No OpenMP team: one of those waits at every
region's end for all its members. Which thread runs a chunk never changes its result: outputs are
bit-identical for any thread count. The instruction set is chosen at compile time from what
``-march=native`` (jittor's flag for every kernel) enables; ``JMOSS_KERNELS_ISA=portable`` forces
the plain C++ path, which must give the same results and is what any other CPU falls back to;
``avx2`` forces the AVX2+F16C path on an AVX-512 CPU (so its code is tested there too; it falls
back to portable on a CPU without AVX2).

Compilation: each (header text, dtypes, bias present or not) combination compiles once, about 2 s,
into jittor's on-disk kernel cache; shapes, thread counts and the activation are runtime arguments
and never recompile.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import numpy as np

from jmoss.errors import DeviceError, JmossError

_HEADER_DIR = Path(__file__).with_name("cpu_kernels")
# The C++ of the kernels, one file per op family (cpu_kernels/README.md), in the order they are
# concatenated into the one `cpu_header` text jt.code compiles: each file uses only those before it.
HEADER_FILES = ("simd.h", "pool.h", "activations.h", "gemv.h", "gemm.h", "gemm_amx.h", "linear.h", "norm_rotary.h",
                "attention.h", "quant_gemv.h", "quant_gemm.h", "quant_vnni.h", "quant_q8.h",
                "quant_linear.h", "decode_block.h", "entry.h")
_ISA_NAMES = {0: "portable", 1: "avx2+f16c", 2: "avx512"}
_ACTIVATIONS = {None: 0, "gelu_new": 1}
ISAS = ("native", "avx2", "portable")

_lock = threading.Lock()
_header_text: str | None = None
_available: bool | None = None
_isa_cache: dict[str, int] = {}
_amx_granted: bool | None = None


def _default_threads() -> int:
    for name in ("JMOSS_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value:
            try:
                threads = int(value.split(",")[0])
            except ValueError:
                raise JmossError(f"{name}={value!r} is not a whole number of threads") from None
            if threads < 1:
                raise JmossError(f"{name}={value!r}: the thread count must be at least 1")
            return threads
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _default_isa() -> str:
    value = os.environ.get("JMOSS_KERNELS_ISA", "native").strip().lower() or "native"
    if value not in ISAS:
        raise JmossError(f"JMOSS_KERNELS_ISA={value!r}: choose one of {', '.join(ISAS)}")
    return value


# How the pool hands out chunks (kernels/cpu_kernels/pool.h): "dynamic", claimed from a shared counter
# (always, outside tests); "static", contiguous shares as OpenMP's schedule(static); "slow-worker",
# dynamic with every worker starting each job 300 us late. Results are bit-identical under all three.
SCHEDULES = {"dynamic": 0, "static": 1, "slow-worker": 2}
# Every cpu_src that may run in parallel starts with this: the schedule of the jobs it starts.
_SCOPE = 'jmoss_pool::scope jmoss_sched((int)data["sched"]);\n'
QUANT_COMPUTES = ("fp32", "int8")

# Smallest M (rows of x) sent to the AMX-BF16 "bf16x3" GEMM where the CPU and kernel offer it; below
# it (decode, tiny batches) the fp32 AVX-512 kernels run. Measured on the 2-core SPR VM, 1024 -> 4096
# fp16 weights streamed from memory, fp32 path / AMX time: M = 4: 0.92x (1T), 0.97x (2T); M = 8:
# 1.14x, 0.98x; M = 16: 1.66x, 1.52x; M = 32: 2.4x. Below ~8 rows both are bound by reading W.
AMX_MIN_M = 8


def _default_quant_compute() -> str:
    value = os.environ.get("JMOSS_KERNELS_QUANT_COMPUTE", "fp32").strip().lower() or "fp32"
    if value not in QUANT_COMPUTES:
        raise JmossError(f"JMOSS_KERNELS_QUANT_COMPUTE={value!r}: choose fp32 (default, exact activations) or int8")
    return value


def _default_amx() -> bool:
    value = os.environ.get("JMOSS_KERNELS_AMX", "1").strip().lower() or "1"
    if value not in ("0", "1", "off", "on", "false", "true"):
        raise JmossError(f"JMOSS_KERNELS_AMX={value!r}: use 1 (default, AMX prefill where available) or 0")
    return value in ("1", "on", "true")


# The process's settings, read from the environment on first use; ``configured`` overrides them per
# thread (a model on its own thread count, ``jmoss.engine.ops.ThreadedKernels``, in a server's
# worker thread leaves the rest of the process alone).
_DEFAULTS: dict[str, Any] = {"threads": _default_threads, "isa": _default_isa, "amx": _default_amx,
                             "quant_compute": _default_quant_compute, "schedule": lambda: "dynamic"}
_settings: dict[str, Any] = {}
_local = threading.local()


def _setting(name: str) -> Any:
    overrides = getattr(_local, "overrides", None)
    if overrides and name in overrides:
        return overrides[name]
    if name not in _settings:
        _settings[name] = _DEFAULTS[name]()
    return _settings[name]


def _threads() -> int:
    return _setting("threads")


def _isa() -> str:
    return _setting("isa")


def _amx() -> bool:
    return _setting("amx")


def _quant_compute() -> str:
    return _setting("quant_compute")


def _sched() -> int:
    return SCHEDULES[_setting("schedule")]


def _amx_min_m() -> int:
    """The kernel's runtime switch: 0 disables the AMX path, else the smallest M that takes it."""
    return AMX_MIN_M if _amx() and _isa() == "native" else 0


@contextlib.contextmanager
def configured(threads: int | None = None, isa: str | None = None, amx: bool | None = None,
               quant_compute: str | None = None, schedule: str | None = None) -> Iterator[None]:
    """Run the block with a given thread count, ISA path ("native", "avx2", "portable"), AMX switch,
    packed-weight prefill compute mode ("fp32" or the opt-in, approximate "int8") and/or pool
    schedule (``SCHEDULES``: tests compare them; only "dynamic" is for use), in this thread.

    All are runtime choices: the thread count, the AMX switch, the compute mode and the schedule
    are kernel arguments, and each ISA path is its own cached kernel, so switching costs nothing
    after the first compile. They apply to the ops built inside the block (jittor runs an op
    later, with the arguments it was built with).
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise JmossError(f"threads={threads!r}: the thread count must be a whole number, at least 1")
    if isa is not None and isa not in ISAS:
        raise JmossError(f"isa={isa!r}: choose one of {', '.join(ISAS)}")
    if quant_compute is not None and quant_compute not in QUANT_COMPUTES:
        raise JmossError(f"quant_compute={quant_compute!r}: choose fp32 or int8")
    if schedule is not None and schedule not in SCHEDULES:
        raise JmossError(f"schedule={schedule!r}: choose one of {', '.join(SCHEDULES)}")
    given = {"threads": threads, "isa": isa, "amx": None if amx is None else bool(amx),
             "quant_compute": quant_compute, "schedule": schedule}
    saved = getattr(_local, "overrides", None)
    _local.overrides = {**(saved or {}), **{k: v for k, v in given.items() if v is not None}}
    try:
        yield
    finally:
        _local.overrides = saved


def _jittor() -> ModuleType:
    from jmoss.jittor_setup import current_device, get_jittor

    jt = get_jittor(current_device() or "cpu")
    if jt.flags.use_cuda:
        raise DeviceError("jmoss.kernels.linear is a CPU kernel; jittor is running on CUDA in this process")
    return jt


def _header(isa: str) -> str:
    global _header_text
    if _header_text is None:
        text = "".join(f"// ---- cpu_kernels/{name}\n" + (_HEADER_DIR / name).read_text() for name in HEADER_FILES)
        _header_text = _header_include(text) or text
    # The define changes the header text, hence jittor's cache key: each path is its own kernel.
    prefix = {"portable": "#define JMOSS_FORCE_PORTABLE 1\n", "avx2": "#define JMOSS_FORCE_AVX2 1\n"}.get(isa, "")
    return prefix + _header_text


def _header_include(text: str) -> str | None:
    """``#include`` of ``text`` saved under jmoss's home in a file named by its hash; None where
    that file cannot be written (the caller then passes the text itself).

    Jittor writes a jt.code op's whole header into the key it builds, hashes and looks up every
    time the op runs, not only when it compiles: with the ~136 KB text inline that cost ~0.2 ms
    an op, a fifth of a CodeGen-350M decode step (20 layer ops and the head). The include keeps
    the key a line long, and the hash in the name still makes every change of the text a new key,
    hence a new kernel.
    """
    from jmoss.home import jmoss_home

    path = jmoss_home() / "kernels" / f"cpu-{hashlib.sha256(text.encode()).hexdigest()[:24]}.h"
    if any(c in str(path) for c in '"\\\n'):  # not writable inside a C string literal as it is
        return None
    try:
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            try:
                tmp.write_text(text, encoding="utf-8")
                os.replace(tmp, path)  # whole or absent: a compile never reads half a header
            finally:
                tmp.unlink(missing_ok=True)
    except (OSError, UnicodeDecodeError):
        return None
    return f'#include "{path}"\n'


_LINEAR_SRC = """
jmoss_q::flinear(in0_p, jmoss_raw(in1_p), {bias}, out0_p, in0_shape0, in0_shape1, in1_shape0,
                 (int)data["threads"], (int)data["act"], (int)data["amx"], (int)data["i8"]);
"""
_SRC_BIAS = _SCOPE + _LINEAR_SRC.format(bias="jmoss_raw(in2_p)")
_SRC_NO_BIAS = _SCOPE + _LINEAR_SRC.format(bias="(const float*)nullptr")


def linear(x: "jt.Var", weight: "jt.Var", bias: "jt.Var | None" = None, *, activation: str | None = None) -> "jt.Var":
    """``activation(x @ weight.T + bias)`` in fp32, reading ``weight`` in its own dtype.

    One multi-threaded pass over the weights: small M is a GEMV at memory speed, larger M a
    register-blocked GEMM; the bias and gelu_new run in the same op, so no intermediate [M, N]
    tensor is written. See the module docstring for shapes and dtypes.
    """
    jt = _jittor()
    if activation not in _ACTIVATIONS:
        raise JmossError(f"activation={activation!r}: choose None or 'gelu_new'")
    if weight.ndim != 2:
        raise JmossError(f"weight must be 2-D [N, K], got shape {list(weight.shape)}")
    n_out, k_in = (int(s) for s in weight.shape)
    if x.ndim < 1 or int(x.shape[-1]) != k_in:
        raise JmossError(f"x of shape {list(x.shape)} does not match weight [N={n_out}, K={k_in}]")
    if str(weight.dtype) not in ("float16", "float32"):
        raise JmossError(f"weight dtype {weight.dtype} is not supported: use float16 or float32")
    lead = list(x.shape[:-1])
    if str(x.dtype) != "float32":
        x = x.float32()
    x2 = x if x.ndim == 2 else x.reshape((-1, k_in))
    inputs = [x2, weight]
    if bias is not None:
        if bias.ndim != 1 or int(bias.shape[0]) != n_out:
            raise JmossError(f"bias of shape {list(bias.shape)} does not match weight [N={n_out}, K={k_in}]")
        if str(bias.dtype) not in ("float16", "float32"):
            raise JmossError(f"bias dtype {bias.dtype} is not supported: use float16 or float32")
        inputs.append(bias)
    m_rows = int(x2.shape[0])
    y = jt.code(
        [m_rows, n_out],
        "float32",
        inputs,
        cpu_header=_header(_isa()),
        cpu_src=_SRC_BIAS if bias is not None else _SRC_NO_BIAS,
        data={"threads": _threads(), "act": _ACTIVATIONS[activation], "amx": _amx_min_m(),
              "i8": int(_quant_compute() == "int8"), "sched": _sched()},
    )
    return y if x.ndim == 2 else y.reshape(lead + [n_out])


_QLINEAR_SRC = """
jmoss_q::qlinear<{bits}>(in0_p, in1_p, jmoss_u8(in2_p), jmoss_raw(in3_p), jmoss_raw(in4_p), {bias}, out0_p,
                   in0_shape0, in0_shape1, in2_shape0, in2_shape1, (jmoss_k::i64)data["group"],
                   (int)data["threads"], (int)data["act"], (int)data["i8"]);
"""


def quant_linear(x: "jt.Var", perm: "jt.Var", qweight: "jt.Var", scales: "jt.Var", zeros: "jt.Var",
                 bias: "jt.Var | None" = None, *, bits: int, group_size: int,
                 activation: str | None = None) -> "jt.Var":
    """``activation(x @ W.T + bias)`` in fp32 for a packed int8/int4 weight (store format 2).

    ``W[n, perm[j]] = scales[n, g] * (qweight codes[n, j] - zeros[n, g])``, ``g = j // group_size``
    (layout in ``layout.group_tensors``). Decode (M < 4 rows) dequantizes in registers inside the
    dot product; prefill (M >= 16) dequantizes one 12-row panel (6 on AVX2) per thread at a time
    into fp32 and runs the outer-product fp32 GEMM over it (4-15 rows: 4-row panels, 4x4 tiles).
    No dequantized copy of the layer is ever made. With ``configured(quant_compute="int8")`` (or
    ``JMOSS_KERNELS_QUANT_COMPUTE=int8``) prefill instead quantizes x per row to 8 bits and
    multiplies on AVX-512 VNNI where ``vnni_ready()``, and decode / small M (< 16 rows) quantizes x per
    block of 32 for integer AVX2 (VNNI where offered) dot products where ``q8_decode_ready()``: faster, but approximate
    (see the module docstring); elsewhere it is ignored.
    """
    jt = _jittor()
    if bits not in (4, 8):
        raise JmossError(f"bits={bits}: packed weights are 4- or 8-bit")
    if activation not in _ACTIVATIONS:
        raise JmossError(f"activation={activation!r}: choose None or 'gelu_new'")
    if group_size < 1:
        raise JmossError(f"group_size={group_size}: a packed weight's group size is a positive integer")
    k_in = int(perm.shape[0])
    n_out, row_bytes = (int(s) for s in qweight.shape)
    groups = -(-k_in // group_size)
    if row_bytes * 8 < k_in * bits or tuple(scales.shape) != (n_out, groups) or tuple(zeros.shape) != (n_out, groups):
        raise JmossError(f"packed weight qweight {list(qweight.shape)} / scales {list(scales.shape)} / zeros "
                         f"{list(zeros.shape)} / perm [{k_in}] disagree for {bits}-bit, group {group_size}")
    if x.ndim < 1 or int(x.shape[-1]) != k_in:
        raise JmossError(f"x of shape {list(x.shape)} does not match the packed weight [N={n_out}, K={k_in}]")
    for name, var, want in (("perm", perm, "int32"), ("scales", scales, "float16"), ("zeros", zeros, "float16")):
        if str(var.dtype) != want:
            raise JmossError(f"{name} must be {want}, got {var.dtype}")
    if str(qweight.dtype) not in ("uint8", "int8"):
        raise JmossError(f"qweight must be uint8, got {qweight.dtype}")
    lead = list(x.shape[:-1])
    if str(x.dtype) != "float32":
        x = x.float32()
    x2 = x if x.ndim == 2 else x.reshape((-1, k_in))
    inputs = [x2, perm, qweight, scales, zeros]
    if bias is not None:
        if bias.ndim != 1 or int(bias.shape[0]) != n_out or str(bias.dtype) not in ("float16", "float32"):
            raise JmossError(f"bias {list(bias.shape)} {bias.dtype} does not fit the packed weight [N={n_out}]")
        inputs.append(bias)
    src = _SCOPE + _QLINEAR_SRC.format(bits=bits, bias="jmoss_raw(in5_p)" if bias is not None else "(const float*)nullptr")
    y = jt.code([int(x2.shape[0]), n_out], "float32", inputs, cpu_header=_header(_isa()), cpu_src=src,
                data={"threads": _threads(), "act": _ACTIVATIONS[activation], "group": int(group_size),
                      "i8": int(_quant_compute() == "int8"), "sched": _sched()})
    return y if x.ndim == 2 else y.reshape(lead + [n_out])


# decode_block: at most this many rows (B*T) take the fused one-op layer; more (prefill) keep the
# per-op path, whose GEMM paths want the rows and whose scratch the planner bills.
FUSED_MAX_ROWS = 16
_BLOCK_LINEARS = ("attn.qkv", "attn.out_proj", "mlp.fc_in", "mlp.fc_out")
_BLOCK_SRC = """
using PT = std::remove_const_t<std::remove_pointer_t<decltype(jmoss_raw(in1_p))>>;
auto mk = [&](const void* w, const int32_t* perm, const uint16_t* sc, const uint16_t* zr, const PT* bias,
              jmoss_k::i64 K, jmoss_k::i64 N, jmoss_k::i64 ldq) {{
    return jmoss_f::lin<{bits}, PT>{{w, perm, sc, zr, bias, K, N, ldq, (jmoss_k::i64)data["group"]}};
}};
{lins}
jmoss_f::decode_block<{bits}, PT>(in0_p, out0_p, jmoss_raw(in1_p), jmoss_raw(in2_p), (float)data["eps"],
    l0, l1, l2, l3, {tail_in}, in0_shape0 / (jmoss_k::i64)data["length"], (jmoss_k::i64)data["length"],
    {keys}_shape1, {keys}_shape3, {keys}_shape2, (jmoss_k::i64)data["start"], (jmoss_k::i64)data["rotary"],
    (int)data["threads"], (int)data["amx"], (int)data["i8"]);
"""


# How the layers of this process's recent steps ran (``reset_decode_path``, then read it): fused into
# one op each, or op by op and why (the last reason seen). ``jmoss bench`` prints it; a prefill of
# more than FUSED_MAX_ROWS tokens is op by op on purpose.
decode_path: dict[str, Any] = {"fused": 0, "per_op": 0, "why": None}


def reset_decode_path() -> None:
    decode_path.update(fused=0, per_op=0, why=None)


def _per_op(why: str) -> None:
    decode_path["per_op"] += 1
    decode_path["why"] = why
    return None


def describe_decode_path() -> str:
    """What the layers run since ``reset_decode_path`` took, in words."""
    fused, per_op = decode_path["fused"], decode_path["per_op"]
    if not fused and not per_op:
        return "no layer ran through jmoss.kernels.decode_block"
    if not per_op:
        return "every layer one fused op (decode_block)"
    what = "every layer op by op" if not fused else f"{per_op} of {fused + per_op} layers op by op"
    return f"{what}: {decode_path['why']}"


def decode_block(h: "jt.Var", w: "dict", keys: "jt.Var", values: "jt.Var", sin: "jt.Var", cos: "jt.Var",
                 attn_bias: "jt.Var", start: int, *, eps: float, rotary_dim: int, bits: int = 0,
                 group_size: int = 0) -> "jt.Var | None":
    """One whole decoder layer in one op for a decode step, or None where it does not apply.

    ``h`` float32 [B, T, D] with B*T <= FUSED_MAX_ROWS; ``w`` the layer's weights in store names,
    fp16 (``bits=0``) or packed (``bits`` 4/8, ``group_size``), with no bias on qkv/out_proj (MOSS,
    CodeGen); the rest as ``attention``. Computes exactly what layer_norm, linear / quant_linear and
    attention compute one op at a time -- same kernels, same order -- and returns
    ``(attn + mlp) + h``; the keys and values of the step are written into the cache in place.
    Returns None (the caller runs the per-op path) for more rows or any other weight layout.
    """
    jt = _jittor()
    batch, length, dim = (int(s) for s in h.shape)
    if batch * length > FUSED_MAX_ROWS:
        return _per_op(f"{batch * length} rows (batch x tokens) > FUSED_MAX_ROWS {FUSED_MAX_ROWS}")
    if str(h.dtype) != "float32":
        return _per_op(f"{h.dtype} activations (the fused layer computes in float32)")
    if any(f"{n}.bias" in w for n in _BLOCK_LINEARS[:2]) or any(f"{n}.bias" not in w for n in _BLOCK_LINEARS[2:]):
        return _per_op("a bias on qkv/out_proj or none on fc_in/fc_out (not MOSS/CodeGen's layout)")
    if str(keys.dtype) != "float32" or str(values.dtype) != "float32":
        return _per_op(f"a {keys.dtype} KV cache (the fused layer keeps it in float32)")
    if str(w["ln_1.weight"].dtype) not in ("float16", "float32"):
        return _per_op(f"{w['ln_1.weight'].dtype} LayerNorm weights")
    params = (w["ln_1.weight"], w["ln_1.bias"], w["mlp.fc_in.bias"], w["mlp.fc_out.bias"])
    if len({str(p.dtype) for p in params}) != 1:
        return _per_op("LayerNorm weights and biases of different dtypes")
    inputs = [h.reshape((batch * length, dim)), w["ln_1.weight"], w["ln_1.bias"]]
    lins = []

    def add(var: "jt.Var") -> str:
        inputs.append(var)
        return f"in{len(inputs) - 1}_p"

    _check_block_shapes(w, dim, int(keys.shape[1]) * int(keys.shape[3]), bits, group_size)
    for i, name in enumerate(_BLOCK_LINEARS):
        bias = f"jmoss_raw({add(w[name + '.bias'])})" if name.startswith("mlp.") else "(const PT*)nullptr"
        if bits:
            parts = [w.get(f"{name}.{p}") for p in ("perm", "qweight", "scales", "zeros")]
            if any(p is None for p in parts) or str(parts[2].dtype) != "float16" or str(parts[0].dtype) != "int32":
                return _per_op(f"{name} is not a store format 2 packed Linear")
            if str(parts[1].dtype) not in ("uint8", "int8") or str(parts[3].dtype) != "float16":
                return _per_op(f"{name} has {parts[1].dtype} codes or {parts[3].dtype} zeros, not a store format 2 packed Linear")
            perm, qw, sc, zr = (add(p) for p in parts)
            k_in, (n_out, ldq) = int(parts[0].shape[0]), (int(d) for d in parts[1].shape)
            lins.append(f"auto l{i} = mk(jmoss_u8({qw}), {perm}, jmoss_raw({sc}), jmoss_raw({zr}), {bias}, "
                        f"{k_in}, {n_out}, {ldq});")
        else:
            weight = w.get(f"{name}.weight")
            if weight is None or str(weight.dtype) != "float16":
                return _per_op(f"{name} weights are {getattr(weight, 'dtype', 'missing')}, not float16")
            n_out, k_in = (int(d) for d in weight.shape)
            wp = add(weight)
            lins.append(f"auto l{i} = mk(jmoss_raw({wp}), nullptr, nullptr, nullptr, {bias}, {k_in}, {n_out}, 0);")
    tail = [add(v) for v in (sin, cos, attn_bias, keys, values)]
    tail_in = ", ".join(tail[:3]) + f", const_cast<float*>({tail[3]}), const_cast<float*>({tail[4]})"
    decode_path["fused"] += 1
    src = _SCOPE + _BLOCK_SRC.format(bits=bits, lins="\n".join(lins), tail_in=tail_in, keys=tail[3][:-2])
    return jt.code([batch, length, dim], "float32", inputs, cpu_header=_header(_isa()), cpu_src=src,
                   data={"eps": float(eps), "length": length, "start": int(start), "rotary": int(rotary_dim),
                         "threads": _threads(), "amx": _amx_min_m(), "i8": int(_quant_compute() == "int8"),
                         "group": int(group_size), "sched": _sched()})


def _check_block_shapes(w: "dict", dim: int, heads_dim: int, bits: int, group_size: int) -> None:
    """Every size decode_block's C++ takes from the weights' shapes agrees with x and the cache
    (the store check guarantees it for a store; a mismatch here would index outside a buffer)."""
    fc_in = w.get("mlp.fc_in.qweight" if bits else "mlp.fc_in.weight")
    if fc_in is None:
        return  # decode_block declines the layer; the per-op path checks it
    inner = int(fc_in.shape[0])
    want = {"attn.qkv": (dim, 3 * dim), "attn.out_proj": (dim, dim), "mlp.fc_in": (dim, inner), "mlp.fc_out": (inner, dim)}
    bad = [] if heads_dim == dim else [f"cache heads x head_dim {heads_dim} != {dim}"]
    for name in ("ln_1.weight", "ln_1.bias"):
        if tuple(w[name].shape) != (dim,):
            bad.append(f"{name} {list(w[name].shape)}")
    for name, size in (("mlp.fc_in.bias", inner), ("mlp.fc_out.bias", dim)):
        if tuple(w[name].shape) != (size,):
            bad.append(f"{name} {list(w[name].shape)}")
    for name, (k_in, n_out) in want.items():
        if not bits:
            weight = w.get(f"{name}.weight")
            if weight is not None and tuple(weight.shape) != (n_out, k_in):
                bad.append(f"{name}.weight {list(weight.shape)}")
            continue
        parts = {p: w.get(f"{name}.{p}") for p in ("perm", "qweight", "scales", "zeros")}
        if any(v is None for v in parts.values()):
            continue  # decode_block declines the layer; the per-op path checks it
        groups = -(-k_in // group_size) if group_size >= 1 else -1
        if (tuple(parts["perm"].shape) != (k_in,) or int(parts["qweight"].shape[0]) != n_out
                or int(parts["qweight"].shape[1]) * 8 < k_in * bits or groups < 1
                or tuple(parts["scales"].shape) != (n_out, groups) or tuple(parts["zeros"].shape) != (n_out, groups)):
            bad.append(f"{name} perm {list(parts['perm'].shape)} qweight {list(parts['qweight'].shape)} scales "
                       f"{list(parts['scales'].shape)} zeros {list(parts['zeros'].shape)} (group {group_size})")
    if bad:
        raise JmossError(f"decode_block: the layer's weights do not fit x [.., {dim}]: {'; '.join(bad)}")


_LAYER_NORM_SRC = """
jmoss_k::layer_norm(in0_p, jmoss_raw(in1_p), jmoss_raw(in2_p), out0_p, (jmoss_k::i64)data["rows"],
                    in0_shape{last}, (float)data["eps"], (int)data["threads"]);
"""


def layer_norm(x: "jt.Var", weight: "jt.Var", bias: "jt.Var", eps: float) -> "jt.Var":
    """LayerNorm over the last dim in fp32, one op (jittor's is ~8 ops per call)."""
    jt = _jittor()
    dim = int(x.shape[-1])
    if tuple(weight.shape) != (dim,) or tuple(bias.shape) != (dim,):
        raise JmossError(f"layer_norm weight {list(weight.shape)} / bias {list(bias.shape)} do not match x {list(x.shape)}")
    if str(x.dtype) != "float32":
        x = x.float32()
    rows = int(np.prod(x.shape[:-1])) if x.ndim > 1 else 1
    return jt.code(x.shape, "float32", [x, weight, bias], cpu_header=_header(_isa()),
                   cpu_src=_SCOPE + _LAYER_NORM_SRC.format(last=x.ndim - 1),
                   data={"rows": rows, "eps": float(eps), "threads": _threads(), "sched": _sched()})


_ROTARY_SRC = """
jmoss_k::rotary_split(in0_p, in1_p, in2_p, out0_p, out1_p, out2_p, out1_shape0, out1_shape2, out1_shape1,
                      out1_shape3, (jmoss_k::i64)data["rotary"]);
"""
_ATTENTION_SRC = """
jmoss_k::attention(in0_p, in1_p, in2_p, in3_p, out0_p, in1_shape0, (jmoss_k::i64)data["length"], in1_shape1,
                   in1_shape3, in1_shape2, (jmoss_k::i64)data["total"], (int)data["threads"]);
"""


def attention(qkv: "jt.Var", keys: "jt.Var", values: "jt.Var", sin: "jt.Var", cos: "jt.Var", attn_bias: "jt.Var",
              start: int, rotary_dim: int) -> "jt.Var":
    """Rotary, KV-cache write and softmax attention for one layer in three ops (see module docstring).

    One kernel splits qkv and rotates q and k; jittor's own setitem writes k and v into the
    cache slots (so the cache stays an ordinary Var that any jittor feature may move or swap);
    the attention kernel then reads the cache in place over its first start+T slots.
    """
    jt = _jittor()
    batch, length, width = (int(s) for s in qkv.shape)
    _, heads, max_len, dim = (int(s) for s in keys.shape)
    total = start + length
    if width != 3 * heads * dim or tuple(values.shape) != tuple(keys.shape) or total > max_len:
        raise JmossError(f"attention: qkv {list(qkv.shape)} / cache {list(keys.shape)} / start {start} disagree")
    for name, var in (("qkv", qkv), ("keys", keys), ("values", values), ("sin", sin), ("cos", cos),
                      ("attn_bias", attn_bias)):
        if str(var.dtype) != "float32":
            raise JmossError(f"attention: {name} must be float32, got {var.dtype}")
    header = _header(_isa())
    head_shape = [batch, heads, length, dim]
    q, k, v = jt.code([[batch * length, heads * dim], head_shape, head_shape], ["float32"] * 3, [qkv, sin, cos],
                      cpu_header=header, cpu_src=_ROTARY_SRC, data={"rotary": rotary_dim})
    keys[:, :, start:total, :] = k
    values[:, :, start:total, :] = v
    context = jt.code([batch * length, heads * dim], "float32", [q, keys, values, attn_bias], cpu_header=header,
                      cpu_src=_SCOPE + _ATTENTION_SRC,
                      data={"length": length, "total": total, "threads": _threads(), "sched": _sched()})
    return context.reshape(batch, length, heads * dim)


def _ask(isa: str, expression: str, data: dict[str, int] | None = None) -> int:
    """An int computed by the compiled header itself (what it was built with, what the CPU grants)."""
    jt = _jittor()
    probe = jt.code([1], "int32", [jt.zeros([1], "int32")], cpu_header=_header(isa),
                    cpu_src=f"out0_p[0] = {expression};", data=data or {})
    return int(probe.numpy()[0])


def isa_path(isa: str | None = None) -> str:
    """Name of the instruction-set path the kernels compiled to, asked of the compiled code itself."""
    isa = isa or _isa()
    if isa not in _isa_cache:
        _isa_cache[isa] = _ask(isa, "JMOSS_ISA")
    return _ISA_NAMES[_isa_cache[isa]]


def amx_prefill() -> bool:
    """True when prefill GEMMs (M >= AMX_MIN_M rows) take the AMX path: it is switched on, the native
    ISA is selected, and the tile state is granted."""
    return bool(_amx_min_m()) and amx_ready()


def amx_ready() -> bool:
    """True when the AMX-BF16 prefill GEMM is compiled in (native path) and Linux grants tile state."""
    global _amx_granted
    if _amx_granted is None:  # fixed for the process: the header and the kernel's grant don't change
        _amx_granted = bool(_ask("native", "jmoss_amx_ready()"))
    return _amx_granted


def vnni_ready() -> bool:
    """True when the opt-in int8 (AVX-512 VNNI) prefill mode for packed weights is compiled in."""
    return bool(_ask("native", "jmoss_vnni_ready()"))


def q8_decode_ready() -> bool:
    """True when the int8 compute mode covers packed decode (M < 16 rows) on the configured ISA path
    (AVX2 and AVX-512 builds: cpu_kernels/quant_q8.h); the portable path keeps fp32 there."""
    return bool(_ask(_isa(), "jmoss_q8_ready()"))


def q8_vnni_ready() -> bool:
    """True when, on the configured ISA path, the int8 compute mode runs packed passes of a few rows
    on AVX-512 VNNI (vpdpbusd 4-row tiles, cpu_kernels/quant_q8.h): there a pass of 2-5 rows of an
    int4 model costs ~1-1.2 one-row passes, which lookup's "auto" relies on."""
    return bool(_ask(_isa(), "jmoss_q8_vnni_ready()"))


def quant_compute() -> str:
    """The compute mode packed weights run in now: "fp32" (exact, the default) or "int8"."""
    return _quant_compute()


def threads_used(threads: int | None = None) -> int:
    """How many pool threads a kernel asking for ``threads`` (default: the configured count) really
    runs on at once (each chunk of a probe job waits for all the others to be claimed)."""
    return _ask(_isa(), 'jmoss_threads_used((int)data["threads"])', {"threads": threads or _threads()})


def memory_read_probe(nbytes: int = 1 << 30, repeats: int = 7, threads: int | None = None) -> float:
    """Median GB/s at which the kernels' threads can stream-read a buffer of ``nbytes``.

    This is the physical bound a GEMV is compared with: same threads, same compiler flags, same
    wide loads, with no arithmetic to speak of. Use a buffer well beyond the last-level cache
    (the default 1 GiB) to measure DRAM; the buffer is freed on return. The buffer is numpy's
    (which advises 2 MiB pages for large arrays) lent to jittor without a copy, so it is read
    through 2 MiB pages where the kernel grants them, as resident weights are: a copy into
    jittor's own memory lands in 4 KiB pages, and on a 2-vCPU Xeon VM that probe read 10.2-11.6
    GB/s where a stream through 2 MiB pages reads ~13-16, a bound the weights beat.
    """
    import time

    import numpy as np

    from jmoss.jittor_setup import wrap_zero_copy

    jt = _jittor()
    threads = threads or _threads()
    host = np.ones(max(16, nbytes // 4), np.float32)
    buf = wrap_zero_copy(jt, host)
    buf.sync()
    src = _SCOPE + "out0_p[0] = jmoss_read_probe(in0_p, in0_shape0, (int)data[\"threads\"]);"
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        jt.code([1], "float32", [buf], cpu_header=_header(_isa()), cpu_src=src,
                data={"threads": threads, "sched": _sched()}).sync()
        if i:  # the first call compiles and faults pages in
            times.append(time.perf_counter() - start)
    del buf, host
    jt.gc()
    return (nbytes // 4 * 4) / float(np.median(times)) / 1e9


def available() -> bool:
    """True when the kernels compile and match a numpy check on this CPU-device jittor.

    Checked once per process (the first call compiles, ~2 s, or reuses jittor's disk cache). The
    model uses plain jittor ops when this is False, so any failure here means "slower", not
    "broken".
    """
    global _available
    with _lock:
        if _available is None:
            _available = _self_check()
        return _available


def _self_check() -> bool:
    import numpy as np

    try:
        jt = _jittor()
        rng = np.random.default_rng(0)
        x = rng.standard_normal((3, 37)).astype(np.float32)
        w = rng.standard_normal((19, 37)).astype(np.float16)
        b = rng.standard_normal(19).astype(np.float16)
        got = linear(jt.array(x), jt.array(w), jt.array(b)).numpy()
    except (JmossError, RuntimeError, OSError):
        return False
    want = x.astype(np.float64) @ w.astype(np.float64).T + b.astype(np.float64)
    return bool(np.allclose(got, want, rtol=1e-4, atol=1e-4))


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def threads_source() -> str:
    """Where the process's default thread count comes from, in words (jmoss info, bench)."""
    for name in ("JMOSS_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(name, "").strip():
            return f"${name}"
    return "the CPUs this process may run on"


def describe_plan(batch: int = 1, threads: int | None = None) -> str:
    """The CPU path a model would take here, from the CPU's flags and the settings, without
    compiling anything (``jmoss info``; ``info()`` asks the compiled kernels themselves)."""
    flags = _cpu_flags()
    isa = _isa()
    native = ("avx512" if "avx512f" in flags else "avx2+f16c" if {"avx2", "fma", "f16c"} <= flags else "portable")
    path = {"native": native, "avx2": "avx2+f16c" if native != "portable" else "portable", "portable": "portable"}[isa]
    count = threads or _default_threads()  # what a model loaded now gets (the environment, read again)
    source = "--threads" if threads else threads_source()
    decode = ("one fused op per layer (decode_block)" if batch <= FUSED_MAX_ROWS else
              f"op by op ({batch} rows > FUSED_MAX_ROWS {FUSED_MAX_ROWS})")
    forced = " (forced by JMOSS_KERNELS_ISA)" if isa != "native" else ""
    plural = "s" if count != 1 else ""
    return (f"CPU kernels: {path} path{forced}, {count} thread{plural} ({source}; --threads or JMOSS_THREADS to "
            f"change), decode {decode}; every layer shape of a MOSS/CodeGen store takes these kernels (jmoss bench "
            f"prints what a run took)")


def info() -> dict[str, Any]:
    """Which path the kernels take here: ISA, threads, and the CPU features that decided it."""
    flags = _cpu_flags()
    _threads(), _isa(), _amx(), _quant_compute()  # bad environment values raise here, not in the self-check
    result: dict[str, Any] = {
        "available": available(),
        "threads": _threads(),
        "requested_isa": _isa(),
        "cpu_features": sorted(f for f in ("avx2", "f16c", "fma", "avx512f", "avx512bw", "avx512_fp16", "amx_tile",
                                           "amx_bf16") if f in flags),
    }
    if result["available"]:
        result["isa"] = isa_path()
        result["threads_used"] = threads_used()
        result["amx_prefill"] = amx_prefill()
        result["amx_min_m"] = AMX_MIN_M
        result["quant_compute"] = _quant_compute()
        result["vnni"] = vnni_ready()
        result["q8_decode"] = q8_decode_ready()
        result["q8_vnni"] = q8_vnni_ready()
    else:
        result["isa"] = None
    return result
