"""Everything a jmoss store must satisfy before any of its bytes is used, checked in one place.

A store is as untrusted as a downloaded checkpoint: its hashes and the manifest's seal are
keyless, so anyone can edit a file and recompute them. The hashes prove a file is what its
manifest says; these checks prove that what the manifest, config.json and each file say is a
store this jmoss can run, and that no value the kernels use as an index (``perm``) or that scales
a result (``scales``, ``zeros``) is out of range. Nothing here trusts a byte of the store: every
field is type-checked before it is compared, every shape before it sizes anything.

The rules, by the name a refusal gives (``CHECKS``), and where the reader applies them:

  manifest  jmoss.json has every field this format writes, with this format's values
            (``Store.open``, ``verify``); a store without them predates them: convert it again
  config    config.json agrees with the manifest (model type, packed width and group size,
            lm_head/wte widths) and is a store's config (``Store.open``, ``verify``)
  identity  a group file's ``__metadata__`` says jmoss wrote it, for this group (layers swapped
            or renamed are refused) and this dtype (when its header is first parsed)
  layout    the tensors, in file order, with exactly the names, shapes and dtypes config.json
            implies (``layout.group_tensors``: packed widths included), data 64-byte aligned
  perm      each ``P.perm`` is a permutation of 0..K-1 (the kernels gather x through it)
  scales    each ``P.scales`` is finite
  zeros     each ``P.zeros`` is within 0..2^bits (the range of the codes)
  finite    the fp16 vectors (LayerNorm weights and biases, Linear biases) are finite

The value checks (perm, scales, zeros, finite) run on the bytes a reader actually uses, the first
time it reads a group (``SpanValues`` collects them as a streaming reader's chunks go by), after
the file's hash matched; `jmoss verify` runs all of them on every file. The fp16 weight matrices'
values are not checked: no value of theirs is an index or a size, and checking them would cost a
pass over the whole store at every load.

Interface: ``check_manifest``, ``check_config``, ``check_group_header``, ``check_group_values``
raise ``CheckFailed(check, detail)``; the reader (``jmoss.store``) names the file and the repair.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from jmoss import layout
from jmoss.config import MossConfig
from jmoss.store_format import (
    DATA_ALIGNMENT,
    FAST_HASH,
    NUMPY_DTYPES,
    PACKED_FORMAT_VERSION,
    QKV_LAYOUT,
    SAFETENSORS_DTYPES,
    STORE_DTYPE,
)

CHECKS = {
    "manifest": "jmoss.json has every field of this format",
    "config": "config.json agrees with the manifest",
    "identity": "the file is the group it stands for",
    "layout": "tensor names, shapes and dtypes as config.json implies",
    "perm": "perm is a permutation of 0..K-1",
    "scales": "scales are finite",
    "zeros": "zeros are within the format's range",
    "finite": "LayerNorm and bias vectors are finite",
}
STORE_FORMAT = "jmoss-store"
PACKED_LAYOUT = "rows n, perm|qweight|scales|zeros"  # the manifest's packed.layout (store_write)
STORE_WBITS = (4, 8, 32)  # 32: fp16 layers


class CheckFailed(Exception):
    """One rule of ``CHECKS`` broken; ``detail`` says by what (one line, never a traceback)."""

    def __init__(self, check: str, detail: str) -> None:
        assert check in CHECKS, check
        super().__init__(f"{check}: {detail}")
        self.check, self.detail = check, detail


def _short(value: Any, limit: int = 60) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        return "<a huge integer>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------- manifest and config

_HEX = {"sha256": re.compile(r"[0-9a-f]{64}"), FAST_HASH: re.compile(r"[0-9a-f]{32}")}


def check_manifest(manifest: Mapping[str, Any]) -> None:
    """Every field this format writes, with its one allowed value where it has one.

    A downgrade (the seal and the fast hashes deleted, as a store written before them) would let a
    changed byte load unhashed: such a store is refused, and converting again writes them.
    """
    fixed = {"format": STORE_FORMAT, "dtype": STORE_DTYPE, "qkv_layout": QKV_LAYOUT, "data_alignment": DATA_ALIGNMENT}
    for key, want in fixed.items():
        if manifest.get(key) != want:
            raise CheckFailed("manifest", f"{key} is {_short(manifest.get(key))}, this format writes {want!r}")
    for key, kind in (("model_type", str), ("source", dict), ("groups", dict), ("files", dict), ("checksum", dict)):
        if not isinstance(manifest.get(key), kind):
            raise CheckFailed("manifest", f"it has no {key} {kind.__name__} (a store from an older jmoss, or edited)")
    if not isinstance(manifest["checksum"].get(FAST_HASH), str):
        raise CheckFailed("manifest", f"its checksum has no {FAST_HASH} seal (a store from an older jmoss, or edited)")
    for name, record in manifest["files"].items():
        for field in ("sha256", FAST_HASH):
            if not (isinstance(record, dict) and isinstance(record.get(field), str) and _HEX[field].fullmatch(record[field])):
                raise CheckFailed("manifest", f"the entry for {str(name)[:100]} has no {field} "
                                              "(a store from an older jmoss, or edited)")
    packed = manifest.get("packed")
    if manifest.get("format_version") == PACKED_FORMAT_VERSION:
        if not isinstance(packed, dict):
            raise CheckFailed("manifest", "format 2 without its packed entry")
        if packed.get("layout") != PACKED_LAYOUT:
            raise CheckFailed("manifest", f"packed.layout is {_short(packed.get('layout'))}, this format writes {PACKED_LAYOUT!r}")
    elif packed is not None:
        raise CheckFailed("manifest", "a packed entry in a format 1 (fp16) store")


def check_config(config: MossConfig, manifest: Mapping[str, Any]) -> None:
    """config.json (already a valid MossConfig, lm_head/wte resolved by ``store.store_config``)
    against the manifest and the widths a store may have."""
    if manifest.get("model_type") != config.model_type:
        raise CheckFailed("config", f"model_type {config.model_type!r}, the manifest says {_short(manifest.get('model_type'))}")
    if config.wbits not in STORE_WBITS:
        raise CheckFailed("config", f"wbits {config.wbits}; a store's layers are 4- or 8-bit packed, or fp16 (32)")
    bits = layout.packed_bits(config)
    packed = manifest.get("packed") if isinstance(manifest.get("packed"), dict) else None
    if not bits:
        if packed is not None:
            raise CheckFailed("config", "wbits 32 (fp16 layers) in a store whose manifest records packed layers")
        if config.head_wbits is not None or config.embed_wbits is not None:
            raise CheckFailed("config", "head_wbits/embed_wbits in an fp16 store (only packed stores pack lm_head, wte)")
        return
    if packed is None:
        raise CheckFailed("config", f"wbits {bits} (packed layers) in a store whose manifest records fp16 ones")
    if packed.get("bits") != bits:
        raise CheckFailed("config", f"wbits {bits}, the manifest's packed entry says {_short(packed.get('bits'))} bits")
    if not 1 <= config.groupsize or packed.get("group_size") != config.groupsize:
        raise CheckFailed("config", f"groupsize {config.groupsize}, the manifest's packed entry says "
                                    f"{_short(packed.get('group_size'))} (a packed store's group size is a positive integer)")
    if config.head_wbits is None or config.embed_wbits is None:
        raise CheckFailed("config", "a packed store's config.json names head_wbits and embed_wbits")
    # a store from before packed heads records neither and has both fp16 (store.store_config)
    recorded = {k: packed.get(k, "float16") for k in ("lm_head", "wte")}
    if recorded != layout.manifest_entry(config):
        raise CheckFailed("config", f"lm_head/wte are {_short(recorded, 140)} in the manifest, config.json says "
                                    f"{layout.manifest_entry(config)}")


# ----------------------------------------------------------------------------- group headers


def check_group_header(config: MossConfig, group: layout.Group, entries: Mapping[str, tuple[str, tuple[int, ...], int, int]],
                       metadata: Mapping[str, str], data_start: int) -> None:
    """A parsed safetensors header (``store_format.parse_safetensors_header``: tensors already
    tile the data) against the group config.json implies."""
    tensors = layout.group_tensors(config, group)
    dtype = "packed" if any(dt != "float16" for _, dt in tensors.values()) else STORE_DTYPE
    want = {"format": "jmoss", "group": str(group), "dtype": dtype}
    got = {k: metadata.get(k) for k in want}
    if got != want:
        raise CheckFailed("identity", f"its metadata says {_short(got, 120)}, this file must be {want}")
    if data_start % DATA_ALIGNMENT:
        raise CheckFailed("layout", f"its data starts at byte {data_start}, not on a {DATA_ALIGNMENT}-byte boundary")
    names = list(entries)
    if names != list(tensors):
        extra = [n for n in names if n not in tensors]
        missing = [n for n in tensors if n not in entries]
        what = (f"it has {_short(extra[0], 100)}, which config.json has no place for" if extra else
                f"it lacks {missing[0]}" if missing else "its tensors are out of the format's order")
        raise CheckFailed("layout", f"{what} (wbits {config.wbits}; expected {list(tensors)[:12]})")
    for name, (st_dtype, shape, _, _) in entries.items():
        want_shape, want_dtype = tensors[name]
        if NUMPY_DTYPES.get(st_dtype) != want_dtype or tuple(shape) != tuple(want_shape):
            raise CheckFailed("layout", f"{name} is {st_dtype} {list(shape)[:8]}, config.json (wbits {config.wbits}, "
                                        f"groupsize {config.groupsize}) implies {SAFETENSORS_DTYPES[want_dtype]} {list(want_shape)}")


# ----------------------------------------------------------------------------- values


def value_tensors(config: MossConfig, group: layout.Group) -> list[str]:
    """The tensors of a group whose values are checked: perms, scales, zeros, fp16 vectors."""
    out = []
    for name, (shape, dtype) in layout.group_tensors(config, group).items():
        if name.endswith((".perm", ".scales", ".zeros")) or (dtype == "float16" and len(shape) == 1):
            out.append(name)
    return out


_EXP16 = 0x7C00  # an fp16 whose exponent bits are all ones is inf or NaN
_ZEROS_TOP = {bits: int(np.float16(1 << bits).view(np.uint16)) for bits in layout.PACKED_BITS}


def _first_bad(ok: np.ndarray, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(int(np.argmin(ok.reshape(-1))), shape))


def check_group_values(config: MossConfig, group: layout.Group, arrays: Mapping[str, np.ndarray]) -> None:
    """The values of ``value_tensors`` (as the reader holds them, any memory) are in range.

    On the fp16 bit patterns, one reduction per tensor in the common case: a value is finite when
    its magnitude bits are below 0x7C00, and a zero is in 0..2^bits when its pattern is at most
    that of 2^bits (non-negative fp16 patterns order like their values; -0.0 is 0x8000)."""
    bits = layout.group_bits(config, group)
    for name in value_tensors(config, group):
        a = np.asarray(arrays[name])
        if name.endswith(".perm"):
            _check_perm(name, a)
            continue
        u = a.view(np.uint16)
        if name.endswith(".zeros"):
            top = _ZEROS_TOP[bits]
            if u.size and int(u.max()) > top:
                ok = (u <= top) | (u == 0x8000)
                if not ok.all():
                    at = _first_bad(ok, a.shape)
                    raise CheckFailed("zeros", f"{name}{list(at)} is {float(a[at])!r}, outside 0..{1 << bits} "
                                               f"(the range of {bits}-bit codes)")
        elif u.size and int((u & 0x7FFF).max()) >= _EXP16:
            at = _first_bad((u & 0x7FFF) < _EXP16, a.shape)
            raise CheckFailed("scales" if name.endswith(".scales") else "finite", f"{name}{list(at)} is {float(a[at])!r}")


def _check_perm(name: str, perm: np.ndarray) -> None:
    k = perm.shape[0]
    if not k:
        return
    low, high = int(perm.min()), int(perm.max())
    if low < 0 or high >= k:
        at = int(np.argmax((perm < 0) | (perm >= k)))
        raise CheckFailed("perm", f"{name}[{at}] is {int(perm[at])}, outside 0..{k - 1}")
    seen = np.zeros(k, dtype=bool)
    seen[perm] = True
    if not seen.all():
        missing = int(np.argmin(seen))
        raise CheckFailed("perm", f"{name} never holds {missing} (a permutation of 0..{k - 1} holds each once)")


class SpanValues:
    """Copies of the value tensors' bytes, taken from a group's data span as a reader reads it.

    ``offsets`` is ``Store.tensor_offsets(group)`` (absolute offsets) and ``start`` the span's
    first byte. Feed it the span's bytes in order (``feed``; the engines' readers hash and read in
    chunks); ``arrays()`` then holds exactly the bytes the reader handed on, whatever the file says
    by the time they are checked. The copies are small: perms, scales, zeros and vectors are about
    1/16 of a packed int4 layer and a few KB of an fp16 one.
    """

    def __init__(self, offsets: Mapping[str, tuple[int, tuple[int, ...], str]], start: int, names: list[str]) -> None:
        self._parts = []
        for name in names:
            offset, shape, dtype = offsets[name]
            array = np.empty(shape, dtype=dtype)
            self._parts.append((offset - start, array.nbytes, name, array))
        self._parts.sort(key=lambda p: p[0])
        self._pos = 0

    def feed(self, chunk: memoryview | np.ndarray) -> None:
        view = memoryview(chunk).cast("B")
        lo, hi = self._pos, self._pos + len(view)
        for begin, nbytes, _, array in self._parts:
            a, b = max(lo, begin), min(hi, begin + nbytes)
            if a < b:
                memoryview(array.reshape(-1).view(np.uint8))[a - begin : b - begin] = view[a - lo : b - lo]
        self._pos = hi

    def arrays(self, span_bytes: int) -> dict[str, np.ndarray]:
        """The collected tensors; ``span_bytes`` must have been fed (a reader that stopped short is a bug)."""
        if self._pos != span_bytes:
            raise ValueError(f"SpanValues fed {self._pos} of the span's {span_bytes} bytes")
        return {name: array for _, _, name, array in self._parts}
