"""Packed ``lm_head`` and ``wte`` in packed stores (format 2): which groups hold what, and the lookup.

A packed store's layers alone are 8.19 GB for moss-moon-003 in int4, but an fp16 ``lm_head`` and
``wte`` add 2.63 GB (10.82 GB, over what a 12 GiB card holds with its KV cache). So by default a
packed store also packs both, with the layers' scheme (group-wise round-to-nearest, group
``config.groupsize``, ``gptq.quantize_rows``; MOSS's GPTQ checkpoints keep these two fp16, so
there are no GPTQ integers to keep):

- ``lm_head`` at the layers' width (int4 stores: int4, int8: int8), computed by the same packed
  GEMV/GEMM as the layers (``ModelOps.quant_linear``);
- ``wte`` as int8 rows (the embedding is read one row per token, so its size matters on disk and
  in RAM, not per token): only the looked-up rows are dequantized (``EmbeddingTable``).

``jmoss convert --keep-head-fp16`` keeps both fp16 (``head_wbits``/``embed_wbits`` 32 in the
store's config.json). Stores written before this (format 2 without those keys, manifest without
``packed.lm_head``) load as fp16 head and embedding (``Store.open``).

This sits beside jmoss/layout.py (``group_tensors`` and ``group_nbytes`` there know packed
layers only); every reader and writer of groups calls the versions here.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping

import numpy as np

from jmoss.config import MossConfig
from jmoss import layout

EMBED_BITS = 8  # wte's default width in a packed store
FP16 = 32  # head_wbits / embed_wbits value meaning "kept fp16" (as wbits 32 means unquantized)
# group -> the store name prefix of its one packable matrix
PACKABLE = {layout.HEAD: "lm_head", layout.EMBED: "wte"}


def head_bits(config: MossConfig) -> int | None:
    """4 or 8 when the store's lm_head is packed, else None (fp16)."""
    if not layout.packed_bits(config):
        return None
    bits = config.head_wbits if config.head_wbits is not None else config.wbits
    return bits if bits in layout.PACKED_BITS else None


def embed_bits(config: MossConfig) -> int | None:
    """4 or 8 when the store's wte is packed, else None (fp16)."""
    if not layout.packed_bits(config):
        return None
    bits = config.embed_wbits if config.embed_wbits is not None else EMBED_BITS
    return bits if bits in layout.PACKED_BITS else None


def group_bits(config: MossConfig, group: layout.Group) -> int | None:
    """Width of the packed matrices of a group (layers: wbits; head/embed: above), None = fp16."""
    if group == layout.HEAD:
        return head_bits(config)
    if group == layout.EMBED:
        return embed_bits(config)
    return layout.packed_bits(config)


def resolved(config: MossConfig, keep_head_fp16: bool = False) -> MossConfig:
    """``config`` with head_wbits/embed_wbits explicit (what a packed store's config.json says)."""
    if not layout.packed_bits(config):
        return replace(config, head_wbits=None, embed_wbits=None)
    if keep_head_fp16:
        return replace(config, head_wbits=FP16, embed_wbits=FP16)
    return replace(config, head_wbits=head_bits(config) or FP16, embed_wbits=embed_bits(config) or FP16)


def group_tensors(config: MossConfig, group: layout.Group) -> dict[str, tuple[tuple[int, ...], str]]:
    """``layout.group_tensors`` with a packed lm_head / wte where the config says so.

    ``P.weight`` [N, K] becomes ``P.perm`` (arange: no act-order), ``P.qweight``, ``P.scales``,
    ``P.zeros`` in its place, laid out exactly like a packed layer Linear.
    """
    tensors = layout.group_tensors(config, group)
    bits = group_bits(config, group) if group in PACKABLE else None
    if bits is None:
        return tensors
    prefix = PACKABLE[group]
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, (shape, dtype) in tensors.items():
        if name != f"{prefix}.weight":
            out[name] = (shape, dtype)
            continue
        n_out, k_in = shape
        g = layout.packed_groups(k_in, config.groupsize)
        out[f"{prefix}.perm"] = ((k_in,), "int32")
        out[f"{prefix}.qweight"] = ((n_out, layout.packed_row_bytes(k_in, bits)), "uint8")
        out[f"{prefix}.scales"] = ((n_out, g), "float16")
        out[f"{prefix}.zeros"] = ((n_out, g), "float16")
    return out


def group_nbytes(config: MossConfig, group: layout.Group, itemsize: int = 2) -> int:
    """Bytes of a group's tensors (no header): fp16 ones at ``itemsize``, packed ones as stored."""
    total = 0
    for shape, dtype in group_tensors(config, group).values():
        count = int(np.prod(shape, dtype=np.int64))
        total += count * (itemsize if dtype == "float16" else np.dtype(dtype).itemsize)
    return total


def embed_row_bytes(config: MossConfig, itemsize: int = 2) -> int:
    """Bytes one token's embedding lookup reads from the table (a row, and its scales/zeros)."""
    bits = embed_bits(config)
    if bits is None:
        return config.n_embd * itemsize
    return layout.packed_row_bytes(config.n_embd, bits) + 4 * layout.packed_groups(config.n_embd, config.groupsize)


def manifest_entry(config: MossConfig) -> dict[str, object]:
    """What the manifest's ``packed`` entry records about lm_head and wte."""
    def one(bits: int | None) -> object:
        return {"bits": bits, "group_size": config.groupsize, "scheme": "rtn"} if bits else "float16"

    return {"lm_head": one(head_bits(config)), "wte": one(embed_bits(config))}


class EmbeddingTable:
    """The host-side token table: ``rows(ids)`` gives float32 rows, dequantizing only those rows.

    ``tensors`` is the embed group (memory-mapped): ``wte.weight`` fp16, or a packed ``wte``.
    """

    def __init__(self, tensors: Mapping[str, np.ndarray], config: MossConfig) -> None:
        self.weight = tensors.get("wte.weight")
        self.group_size = config.groupsize
        if self.weight is None:
            self.bits = embed_bits(config)
            self.perm = np.asarray(tensors["wte.perm"])
            self.qweight, self.scales, self.zeros = tensors["wte.qweight"], tensors["wte.scales"], tensors["wte.zeros"]
            self.inverse = np.argsort(self.perm)

    @property
    def packed(self) -> bool:
        return self.weight is None

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """float32 [len(ids), n_embd] for flat token ids."""
        ids = np.asarray(ids).reshape(-1)
        if self.weight is not None:
            return np.asarray(self.weight[ids], dtype=np.float32)
        from jmoss.converters.gptq import unpack_codes

        k_in = int(self.perm.shape[0])
        codes = unpack_codes(np.asarray(self.qweight[ids]), self.bits, k_in).astype(np.float32)
        g = np.arange(k_in) // self.group_size
        w = (codes - np.asarray(self.zeros[ids], np.float32)[:, g]) * np.asarray(self.scales[ids], np.float32)[:, g]
        return w[:, self.inverse]  # position j holds input feature perm[j]


def store_nbytes(config: MossConfig) -> int:
    """Bytes of every group's tensors (the store's size, less headers, config and tokenizer)."""
    return sum(group_nbytes(config, g) for g in layout.all_groups(config))


def describe_store(config: MossConfig) -> str:
    """One line for `jmoss info`: the store's size and what each part is stored as."""
    from jmoss.sizes import format_gb

    def width(bits: int | None) -> str:
        return f"int{bits}" if bits else "fp16"

    layers = sum(group_nbytes(config, i) for i in range(config.n_layer))
    parts = [f"layers {format_gb(layers)} ({width(layout.packed_bits(config))})",
             f"head {format_gb(group_nbytes(config, layout.HEAD))} (lm_head {width(head_bits(config))})",
             f"embedding {format_gb(group_nbytes(config, layout.EMBED))} (wte {width(embed_bits(config))})"]
    return f"store: {format_gb(store_nbytes(config))} = " + " + ".join(parts)
