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
