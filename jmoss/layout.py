"""The jmoss store layout: its groups, tensor names, shapes and files, and how Hugging Face
MOSS/CodeGen tensor names map onto them.

The format is the runtime's own: the store reader, the planner and the engine learn it here, and
the converters (``jmoss.converters``) import it to write stores, never the other way round.

The store groups tensors by what the runtime moves together: one group per transformer layer
(one contiguous file), plus ``embed`` (the token table, needed one row per token) and ``head``
(final LayerNorm and lm_head). Names inside a group drop the ``transformer.h.{i}.`` prefix.

The one re-layout done at conversion time: CodeGen's fused ``qkv_proj`` rows are laid out for
4 TPU shards, each shard holding (query, VALUE, key) chunks of n_head/4 heads. The store keeps a
fused matrix ``attn.qkv.weight`` of shape [3*n_embd, n_embd] whose rows are instead
[query heads 0..H-1 | key heads 0..H-1 | value heads 0..H-1], each head's D rows in order, so the
runtime splits q, k, v with plain slices. See ``qkv_row_order``.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Mapping

import numpy as np

from jmoss.config import QKV_SHARDS, MossConfig
from jmoss.errors import ConfigError

EMBED = "embed"
HEAD = "head"

# Store names of one layer's tensors, in the order they are written to the layer file.
LAYER_NAMES = (
    "ln_1.weight",
    "ln_1.bias",
    "attn.qkv.weight",
    "attn.out_proj.weight",
    "mlp.fc_in.weight",
    "mlp.fc_in.bias",
    "mlp.fc_out.weight",
    "mlp.fc_out.bias",
)
EMBED_NAMES = ("wte.weight",)
HEAD_NAMES = ("ln_f.weight", "ln_f.bias", "lm_head.weight", "lm_head.bias")

_LAYER_RE = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")
# Buffers some checkpoints carry that the runtime rebuilds or never needs.
# Matched whole (a name like "mlp.attn.bias" is not one of them: it is refused, never dropped).
_IGNORED_BUFFERS = frozenset(("attn.causal_mask", "attn.masked_bias", "attn.bias", "attn.embed_positions"))
_HF_LAYER_TO_STORE = {
    "ln_1.weight": "ln_1.weight",
    "ln_1.bias": "ln_1.bias",
    "attn.qkv_proj.weight": "attn.qkv.weight",
    "attn.out_proj.weight": "attn.out_proj.weight",
    "mlp.fc_in.weight": "mlp.fc_in.weight",
    "mlp.fc_in.bias": "mlp.fc_in.bias",
    "mlp.fc_out.weight": "mlp.fc_out.weight",
    "mlp.fc_out.bias": "mlp.fc_out.bias",
}
_HF_TOP_TO_STORE = {
    "transformer.wte.weight": (EMBED, "wte.weight"),
    "transformer.ln_f.weight": (HEAD, "ln_f.weight"),
    "transformer.ln_f.bias": (HEAD, "ln_f.bias"),
    "lm_head.weight": (HEAD, "lm_head.weight"),
    "lm_head.bias": (HEAD, "lm_head.bias"),
}

Group = str | int  # "embed", "head", or a layer index


def layer_file(i: int) -> str:
    return f"layer_{i:03d}.safetensors"


def group_file(group: Group) -> str:
    """File name (inside a store) holding a group's tensors."""
    if isinstance(group, int):
        return layer_file(group)
    return f"{group}.safetensors"


def group_shapes(config: MossConfig, group: Group) -> dict[str, tuple[int, ...]]:
    """Expected shape of every tensor in a group, in file order."""
    d, inner, vocab = config.n_embd, config.inner_dim, config.vocab_size
    if group == EMBED:
        return {"wte.weight": (vocab, d)}
    if group == HEAD:
        return {"ln_f.weight": (d,), "ln_f.bias": (d,), "lm_head.weight": (vocab, d), "lm_head.bias": (vocab,)}
    return {
        "ln_1.weight": (d,),
        "ln_1.bias": (d,),
        "attn.qkv.weight": (3 * d, d),
        "attn.out_proj.weight": (d, d),
        "mlp.fc_in.weight": (inner, d),
        "mlp.fc_in.bias": (inner,),
        "mlp.fc_out.weight": (d, inner),
        "mlp.fc_out.bias": (d,),
    }


# ---- packed (store format v2) layers: see docs/store-format.md "Packed layers"
QUANT_LINEARS = ("attn.qkv", "attn.out_proj", "mlp.fc_in", "mlp.fc_out")
PACKED_BITS = (4, 8)


def packed_bits(config: MossConfig) -> int | None:
    """4 or 8 when the store's (or checkpoint's) layers are packed integers, else None (fp16)."""
    return config.wbits if config.wbits in PACKED_BITS else None


def packed_row_bytes(k_in: int, bits: int) -> int:
    """Bytes of one output row of a packed weight: K values at ``bits`` each, padded to 4 bytes."""
    return -(-k_in * bits // 32) * 4


def packed_groups(k_in: int, group_size: int) -> int:
    return -(-k_in // group_size)


def linear_shapes(config: MossConfig) -> dict[str, tuple[int, int]]:
    """[out, in] of each quantizable Linear of a layer, by store name prefix."""
    d, inner = config.n_embd, config.inner_dim
    return {"attn.qkv": (3 * d, d), "attn.out_proj": (d, d), "mlp.fc_in": (inner, d), "mlp.fc_out": (d, inner)}


def packed_parts(prefix: str, shape: tuple[int, ...], bits: int, group_size: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """The four stored tensors of a packed Linear ``prefix`` whose fp16 weight is ``shape`` [N, K]."""
    n_out, k_in = shape
    g = packed_groups(k_in, group_size)
    return {f"{prefix}.perm": ((k_in,), "int32"),
            f"{prefix}.qweight": ((n_out, packed_row_bytes(k_in, bits)), "uint8"),
            f"{prefix}.scales": ((n_out, g), "float16"),
            f"{prefix}.zeros": ((n_out, g), "float16")}


def _plain_group_tensors(config: MossConfig, group: Group) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shape and numpy dtype of every tensor of a group, in file order (fp16 or packed layers;
    ``group_tensors`` adds the packed lm_head / wte).

    A packed Linear ``P`` [N, K] is four tensors instead of ``P.weight``: ``P.perm`` int32 [K]
    (input feature read at position j, i.e. the act-order permutation sorting features by group),
    ``P.qweight`` uint8 [N, packed_row_bytes] (row n = output n, values LSB first: int8 one per
    byte, int4 feature 2j in the low nibble of byte j), ``P.scales`` and ``P.zeros`` fp16
    [N, G] (G groups of ``config.groupsize`` along the permuted input), W[n, perm[j]] =
    scales[n, g] * (q[n, j] - zeros[n, g]) with g = j div groupsize.
    """
    bits = packed_bits(config)
    if bits is None or group in (EMBED, HEAD):
        return {name: (shape, "float16") for name, shape in group_shapes(config, group).items()}
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, shape in group_shapes(config, group).items():
        prefix = name[: -len(".weight")]
        if name.endswith(".weight") and prefix in QUANT_LINEARS:
            out.update(packed_parts(prefix, shape, bits, config.groupsize))
        else:
            out[name] = (shape, "float16")
    return out


def all_groups(config: MossConfig) -> list[Group]:
    """Every group in the order the runtime consumes them (and the converter writes them)."""
    return [EMBED, *range(config.n_layer), HEAD]




def map_hf_name(name: str, config: MossConfig) -> tuple[Group, str] | None:
    """Map an HF tensor name to (group, store name); None for buffers the runtime ignores.

    Raises KeyError for a name that belongs to no MOSS/CodeGen tensor, so the converter can say
    which tensor of a checkpoint is unexpected (usually: a different architecture).
    """
    if name in _HF_TOP_TO_STORE:
        return _HF_TOP_TO_STORE[name]
    m = _LAYER_RE.match(name)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        if rest in _IGNORED_BUFFERS:
            return None
        if rest in _HF_LAYER_TO_STORE and i < config.n_layer:
            return i, _HF_LAYER_TO_STORE[rest]
    raise KeyError(name)


def qkv_row_order(config: MossConfig) -> np.ndarray:
    """Source rows of qkv_proj, in store order [q heads | k heads | v heads].

    In the source, output feature r of part p (0=query, 1=value, 2=key), head h, dim e is
        r = (h div (H/4)) * (3d/4) + p * (d/4) + (h mod (H/4)) * D + e
    (moss-spec §1.5). Row j of the store matrix is source row order[j].
    """
    d, heads, dim = config.n_embd, config.n_head, config.head_dim
    per_shard = heads // QKV_SHARDS
    order = np.empty(3 * d, dtype=np.int64)
    j = 0
    for part in (0, 2, 1):  # query, key, value in the source's part numbering
        for h in range(heads):
            base = (h // per_shard) * (3 * d // QKV_SHARDS) + part * (d // QKV_SHARDS) + (h % per_shard) * dim
            order[j : j + dim] = np.arange(base, base + dim)
            j += dim
    return order


def relayout(store_name: str, array: np.ndarray, config: MossConfig) -> np.ndarray:
    """Apply the store's re-layout to one tensor (only the fused qkv changes)."""
    if store_name == "attn.qkv.weight":
        return np.ascontiguousarray(array[qkv_row_order(config)])
    return array


def split_state_dict(
    state_dict: Mapping[str, np.ndarray], config: MossConfig, dtype: np.dtype | str | None = None
) -> dict[Group, dict[str, np.ndarray]]:
    """Turn an in-memory HF state dict into store groups (re-laid out, optionally cast).

    Each group's tensors come out in ``group_shapes`` (file) order whatever the order of
    ``state_dict``, so callers never depend on how a transformers version orders its modules.

    Used by tests and tools that build a model without going through files; the converter applies
    the same ``map_hf_name`` + ``relayout`` one tensor at a time.
    """
    groups: dict[Group, dict[str, np.ndarray]] = {g: {} for g in all_groups(config)}
    for name, value in state_dict.items():
        target = map_hf_name(name, config)
        if target is None:
            continue
        group, store_name = target
        array = np.asarray(value)
        if dtype is not None:
            array = array.astype(dtype)
        groups[group][store_name] = relayout(store_name, array, config)
    ordered: dict[Group, dict[str, np.ndarray]] = {}
    for group, arrays in groups.items():
        expected = group_shapes(config, group)
        missing = [n for n in expected if n not in arrays]
        if missing:
            raise KeyError(f"state dict lacks {', '.join(missing)} for group {group!r}")
        # file order, not the source's key order (transformers 5.24 reordered CodeGen's state dict)
        ordered[group] = {n: arrays[n] for n in expected}
    return ordered


def to_hf_state_dict(groups: Mapping[Group, Mapping[str, np.ndarray]], config: MossConfig) -> dict[str, np.ndarray]:
    """The inverse of ``split_state_dict``: store groups back to Hugging Face CodeGen names.

    Used to load a store's exact weights into transformers (``jmoss bench --compare torch``). The
    qkv re-layout is a row permutation, so it is undone by scattering row j back to order[j].
    """
    store_to_hf_layer = {v: k for k, v in _HF_LAYER_TO_STORE.items()}
    out: dict[str, np.ndarray] = {}
    for hf_name, (group, store_name) in _HF_TOP_TO_STORE.items():
        out[hf_name] = np.asarray(groups[group][store_name])
    order = qkv_row_order(config)
    for i in range(config.n_layer):
        for store_name, array in groups[i].items():
            array = np.asarray(array)
            if store_name == "attn.qkv.weight":
                source = np.empty_like(array)
                source[order] = array
                array = source
            out[f"transformer.h.{i}.{store_to_hf_layer[store_name]}"] = array
    return out

def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """[r, K] integer codes (0..2^bits-1) -> [r, packed_row_bytes] uint8, LSB first."""
    rows, k_in = codes.shape
    out = np.zeros((rows, packed_row_bytes(k_in, bits)), np.uint8)
    c = codes.astype(np.uint8)
    if bits == 8:
        out[:, :k_in] = c
    else:
        lo, hi = c[:, 0::2], c[:, 1::2]
        out[:, : lo.shape[1]] = lo
        out[:, : hi.shape[1]] |= hi << 4
    return out

def unpack_codes(packed: np.ndarray, bits: int, k_in: int) -> np.ndarray:
    """The inverse of pack_codes: [r, K] uint8 codes."""
    if bits == 8:
        return packed[:, :k_in].copy()
    out = np.empty((packed.shape[0], k_in), np.uint8)
    out[:, 0::2] = packed[:, : (k_in + 1) // 2] & 15
    out[:, 1::2] = packed[:, : k_in // 2] >> 4
    return out


# --- packed lm_head / wte (format 2 stores written with them packed) ---

EMBED_BITS = 8  # wte's default width in a packed store
# lm_head's default width in a packed store, whatever the layers' width: at 4 bits its rounding
# moved a tiny GPTQ model's logits by 5.1e-2 of max|logit| against fp16, at 8 bits by 3.8e-3
# (docs/store-format.md); llama.cpp keeps its output matrix at 6-8 bits in its 4-bit formats too.
HEAD_BITS = 8
FP16 = 32  # head_wbits / embed_wbits value meaning "kept fp16" (as wbits 32 means unquantized)
WIDTHS = (4, 8, 16)  # what `jmoss convert --head-bits/--embed-bits` take: 16 = fp16
# group -> the store name prefix of its one packable matrix
PACKABLE = {HEAD: "lm_head", EMBED: "wte"}


def head_bits(config: MossConfig) -> int | None:
    """4 or 8 when the store's lm_head is packed, else None (fp16)."""
    if not packed_bits(config):
        return None
    bits = config.head_wbits if config.head_wbits is not None else HEAD_BITS
    return bits if bits in PACKED_BITS else None


def embed_bits(config: MossConfig) -> int | None:
    """4 or 8 when the store's wte is packed, else None (fp16)."""
    if not packed_bits(config):
        return None
    bits = config.embed_wbits if config.embed_wbits is not None else EMBED_BITS
    return bits if bits in PACKED_BITS else None


def group_bits(config: MossConfig, group: Group) -> int | None:
    """Width of the packed matrices of a group (layers: wbits; head/embed: above), None = fp16."""
    if group == HEAD:
        return head_bits(config)
    if group == EMBED:
        return embed_bits(config)
    return packed_bits(config)


def resolved(config: MossConfig, keep_head_fp16: bool = False, *, head_width: int | None = None,
             embed_width: int | None = None) -> MossConfig:
    """``config`` with head_wbits/embed_wbits explicit (what a packed store's config.json says).

    ``head_width`` / ``embed_width`` (4, 8 or 16 = fp16; None: the config's, else the defaults
    HEAD_BITS / EMBED_BITS) choose lm_head's and wte's widths; ``keep_head_fp16`` makes both 16."""
    if not packed_bits(config):
        return replace(config, head_wbits=None, embed_wbits=None)
    if keep_head_fp16:
        head_width, embed_width = head_width or 16, embed_width or 16
    for name, width in (("head width", head_width), ("embedding width", embed_width)):
        if width is not None and width not in WIDTHS:
            raise ConfigError(f"{name} {width}: choose 4, 8 or 16 (fp16)")
    spelled = {4: 4, 8: 8, 16: FP16, None: None}  # config.json spells fp16 as 32, like wbits
    config = replace(config, head_wbits=spelled[head_width] or config.head_wbits,
                     embed_wbits=spelled[embed_width] or config.embed_wbits)
    return replace(config, head_wbits=head_bits(config) or FP16, embed_wbits=embed_bits(config) or FP16)


def group_tensors(config: MossConfig, group: Group) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shape and numpy dtype of every tensor of a group, in file order: fp16, packed layers
    (see ``_plain_group_tensors``) and a packed lm_head / wte where the config says so.

    ``P.weight`` [N, K] becomes ``P.perm`` (arange: no act-order), ``P.qweight``, ``P.scales``,
    ``P.zeros`` in its place, laid out exactly like a packed layer Linear.
    """
    tensors = _plain_group_tensors(config, group)
    bits = group_bits(config, group) if group in PACKABLE else None
    if bits is None:
        return tensors
    prefix = PACKABLE[group]
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, (shape, dtype) in tensors.items():
        if name != f"{prefix}.weight":
            out[name] = (shape, dtype)
            continue
        out.update(packed_parts(prefix, shape, bits, config.groupsize))
    return out


def group_nbytes(config: MossConfig, group: Group, itemsize: int = 2) -> int:
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
    return packed_row_bytes(config.n_embd, bits) + 4 * packed_groups(config.n_embd, config.groupsize)


def manifest_entry(config: MossConfig) -> dict[str, object]:
    """What the manifest's ``packed`` entry records about lm_head and wte."""
    def one(bits: int | None) -> object:
        return {"bits": bits, "group_size": config.groupsize, "scheme": "rtn"} if bits else "float16"

    return {"lm_head": one(head_bits(config)), "wte": one(embed_bits(config))}


def store_nbytes(config: MossConfig) -> int:
    """Bytes of every group's tensors (the store's size, less headers, config and tokenizer)."""
    return sum(group_nbytes(config, g) for g in all_groups(config))


def describe_store(config: MossConfig) -> str:
    """One line for `jmoss info`: the store's size and what each part is stored as."""
    from jmoss.sizes import format_gb

    def width(bits: int | None) -> str:
        return f"int{bits}" if bits else "fp16"

    layers = sum(group_nbytes(config, i) for i in range(config.n_layer))
    parts = [f"layers {format_gb(layers)} ({width(packed_bits(config))})",
             f"head {format_gb(group_nbytes(config, HEAD))} (lm_head {width(head_bits(config))})",
             f"embedding {format_gb(group_nbytes(config, EMBED))} (wte {width(embed_bits(config))})"]
    return f"store: {format_gb(store_nbytes(config))} = " + " + ".join(parts)
