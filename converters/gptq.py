"""Unpack and dequantize MOSS's GPTQ QuantLinear tensors to fp16 (moss-spec §2).

Per quantized Linear (in -> out features, b bits, pack = 32/b values per int32):
    qweight [in*b/32, out] int32   input feature k = r*pack + j at bits [b*j, b*j+b) of row r
    qzeros  [G, out*b/32]  int32   (zero - 1), output feature n = c*pack + j at bits [b*j, ...)
    scales  [G, out]       fp16
    g_idx   [in]           int32   group of each input feature (act-order allowed: always read it)
and  W[n, k] = scales[g, n] * (q[k, n] - z[g, n])  with g = g_idx[k]  (torch layout [out, in]).

Bits and group count are inferred from the shapes, never from config.wbits (spec §2.6: one
published config states the wrong wbits). The product is formed exactly in fp32 (a <=9-bit
integer times an fp16 scale) and rounded once to fp16, which equals the reference kernel's
fp16 ``(q - z) * scale``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jmoss.errors import CheckpointError
from jmoss.layout import pack_codes, unpack_codes

SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
SUPPORTED_BITS = (2, 4, 8)


@dataclass(frozen=True)
class QuantSpec:
    """What the shapes of one QuantLinear say: sizes, bits and group count."""

    in_features: int
    out_features: int
    bits: int
    groups: int

    @property
    def pack(self) -> int:
        return 32 // self.bits


def infer_spec(name: str, qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray) -> QuantSpec:
    """Check the four tensors agree and return their QuantSpec; ``name`` is for error messages."""
    if qweight.ndim != 2 or qzeros.ndim != 2 or scales.ndim != 2 or g_idx.ndim != 1:
        raise CheckpointError(f"{name}: GPTQ tensors have unexpected ranks (qweight {qweight.shape}, qzeros {qzeros.shape}, scales {scales.shape}, g_idx {g_idx.shape})")
    in_features, out_features = g_idx.shape[0], qweight.shape[1]
    bits_x = 32 * qweight.shape[0]
    if bits_x % in_features or bits_x // in_features not in SUPPORTED_BITS:
        raise CheckpointError(
            f"{name}: qweight {qweight.shape} with {in_features} input features (from g_idx) gives no "
            f"supported bit width ({', '.join(map(str, SUPPORTED_BITS))})"
        )
    bits = bits_x // in_features
    groups = scales.shape[0]
    if scales.shape != (groups, out_features):
        raise CheckpointError(f"{name}: scales {scales.shape} should be [groups, {out_features}]")
    if qzeros.shape != (groups, out_features * bits // 32):
        raise CheckpointError(f"{name}: qzeros {qzeros.shape} should be [{groups}, {out_features * bits // 32}] for {bits}-bit")
    if g_idx.size and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise CheckpointError(f"{name}: g_idx refers to groups outside 0..{groups - 1}")
    return QuantSpec(in_features, out_features, bits, groups)


def unpack_zeros(qzeros: np.ndarray, bits: int) -> np.ndarray:
    """[G, out] int16 zero points (stored value + 1), unpacked along the output dim."""
    pack, mask = 32 // bits, (1 << bits) - 1
    words = qzeros.view(np.uint32)
    shifts = (bits * np.arange(pack, dtype=np.uint32))[None, None, :]
    values = (words[:, :, None] >> shifts) & mask  # [G, out/pack, pack]: n = c*pack + j
    return values.reshape(qzeros.shape[0], -1).astype(np.int16) + 1


def dequantize_rows(
    qweight: np.ndarray,
    zeros: np.ndarray,
    scales: np.ndarray,
    g_idx: np.ndarray,
    spec: QuantSpec,
    rows: np.ndarray | slice,
) -> np.ndarray:
    """fp16 W[rows, :] (output features ``rows``, all inputs) — a chunk of the [out, in] matrix.

    ``zeros`` is ``unpack_zeros(qzeros)``; asking for a subset of rows keeps memory to one chunk
    and lets the caller apply the store's qkv row order while dequantizing.
    """
    pack, mask = spec.pack, (1 << spec.bits) - 1
    words = qweight.view(np.uint32)[:, rows]  # [in/pack, r]
    shifts = (spec.bits * np.arange(pack, dtype=np.uint32))[None, :, None]
    q = ((words[:, None, :] >> shifts) & mask).reshape(spec.in_features, -1)  # [in, r], k = r*pack + j
    g = g_idx.astype(np.int64)
    z = zeros[:, rows][g]  # [in, r]
    s = scales[:, rows][g].astype(np.float32)
    w = (q.astype(np.int16) - z).astype(np.float32) * s
    return np.ascontiguousarray(w.T.astype(np.float16))


def dequantize(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray, name: str = "QuantLinear") -> np.ndarray:
    """The whole fp16 weight [out, in] of one QuantLinear."""
    spec = infer_spec(name, qweight, qzeros, scales, g_idx)
    return dequantize_rows(qweight, unpack_zeros(qzeros, spec.bits), scales, g_idx, spec, slice(None))


# ---------------------------------------------------------------------- packed store layers
# Store format 2 keeps the integers (docs/store-format.md "Packed layers"): rows are output
# features, the input dim is permuted once so that every group is a contiguous run of
# ``group_size`` positions, and scales/zeros are fp16 [out, groups] with the "+1" already applied.




def act_order_perm(name: str, g_idx: np.ndarray, group_size: int) -> np.ndarray:
    """The input permutation that makes each group contiguous: position j reads feature perm[j].

    Raises CheckpointError when g_idx does not put exactly ``group_size`` features in every group
    (but the last): such a layout has no contiguous-group form, so it can only be dequantized.
    """
    perm = np.argsort(g_idx, kind="stable").astype(np.int32)
    if not np.array_equal(g_idx[perm], np.arange(g_idx.shape[0]) // group_size):
        raise CheckpointError(
            f"{name}: its g_idx does not hold {group_size} input features per group, so it cannot be kept "
            "packed; convert with --dequantize (fp16 store)"
        )
    return perm


def packed_rows(qweight: np.ndarray, zeros: np.ndarray, scales: np.ndarray, perm: np.ndarray, spec: QuantSpec,
                rows: np.ndarray | slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(qweight uint8 [r, row bytes], scales fp16 [r, G], zeros fp16 [r, G]) of output rows ``rows``.

    The GPTQ integers are copied, never requantized: code[n, j] = q[perm[j], n] and the zero
    point is the stored value + 1 (``zeros`` is ``unpack_zeros(qzeros)``), an integer <= 256
    that fp16 holds exactly.
    """
    pack, mask = spec.pack, (1 << spec.bits) - 1
    words = qweight.view(np.uint32)[:, rows]  # [in/pack, r]
    shifts = (spec.bits * np.arange(pack, dtype=np.uint32))[None, :, None]
    q = ((words[:, None, :] >> shifts) & mask).reshape(spec.in_features, -1)  # [in, r]
    codes = q[perm].T  # [r, K] in permuted input order
    s = np.ascontiguousarray(scales[:, rows].T.astype(np.float16))
    z = np.ascontiguousarray(zeros[:, rows].T.astype(np.float16))
    return pack_codes(codes, spec.bits), s, z


def quantize_rows(weight: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round-to-nearest group-wise quantization of fp16/fp32 rows [r, K] (``jmoss convert --quantize``).

    Per row and group of ``group_size`` inputs: lo/hi = min/max of the group with 0 included,
    scale = fp16((hi - lo) / (2^bits - 1)) (1 where the group is all zero), zero =
    clip(round(-lo / scale), 0, 2^bits - 1), code = clip(round(w / scale) + zero, 0, 2^bits - 1).
    Returns (packed codes, scales fp16, zeros fp16) as ``packed_rows`` does.
    """
    maxq = (1 << bits) - 1
    w = np.asarray(weight, np.float32)
    r, k_in = w.shape
    g = -(-k_in // group_size)
    pad = np.zeros((r, g * group_size), np.float32)
    pad[:, :k_in] = w
    valid = (np.arange(g * group_size) < k_in).reshape(1, g, group_size)
    blocks = pad.reshape(r, g, group_size)
    lo = np.minimum(np.where(valid, blocks, np.inf).min(2), 0)
    hi = np.maximum(np.where(valid, blocks, -np.inf).max(2), 0)
    scale = ((hi - lo) / maxq).astype(np.float16)
    scale[scale == 0] = 1
    s32 = scale.astype(np.float32)
    zero = np.clip(np.round(-lo / s32), 0, maxq)
    codes = np.clip(np.round(blocks / s32[:, :, None]) + zero[:, :, None], 0, maxq).reshape(r, -1)[:, :k_in]
    return pack_codes(codes, bits), scale, zero.astype(np.float16)


def dequantize_packed(qweight: np.ndarray, scales: np.ndarray, zeros: np.ndarray, perm: np.ndarray, bits: int,
                      group_size: int) -> np.ndarray:
    """float32 W [N, K] (original input order) of a packed store Linear: tests, fallbacks, tools."""
    k_in = perm.shape[0]
    codes = unpack_codes(np.asarray(qweight), bits, k_in).astype(np.float32)
    g = np.arange(k_in) // group_size
    w_perm = (codes - np.asarray(zeros, np.float32)[:, g]) * np.asarray(scales, np.float32)[:, g]
    w = np.empty_like(w_perm)
    w[:, np.asarray(perm)] = w_perm
    return w
