"""Crafted stores for the store-check tests: small valid stores, and families of edits an attacker
could make to them and then re-seal (the manifest's hashes and seal are keyless: recomputed here as
an attacker would), each with the file and the ``jmoss.store_check`` check that must refuse it.

- ``build_bases(root)``: one store per format (``FORMATS``): fp16; int4 with the default int8
  lm_head and wte; int4 with lm_head and wte at 4 bits; int8 with fp16 lm_head and wte. Random
  weights (numpy only), act-order perms on the layers, real round-to-nearest codes.
- ``cases(bases)``: the families, generated from the stores' own headers: every perm, scales,
  zeros and vector tensor of every group (layers, head, embedding) at several positions and values;
  header identity and layout edits of every group file; widths, config and manifest edits.
- ``crafted(path, case)``: a context manager that applies a case to a store in place, re-seals it,
  and restores every byte on exit (so a family runs on one copy of each store).

Used in-process by tests/test_store_check.py and, for the loads that run the kernels, by a child
process (``python tests/crafted_stores.py ROOT``) so a crash would fail a test instead of pytest.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from jmoss import layout
from jmoss.config import MossConfig
from jmoss.converters import gptq
from jmoss.store import FAST_HASH, MANIFEST, Store, file_record, sealed_manifest_bytes, write_store_from_groups

BASE = MossConfig(vocab_size=96, n_positions=32, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, model_type="moss",
                  groupsize=32)
# name -> (wbits, lm_head width, wte width); widths 16 = fp16
FORMATS = {"fp16": (32, None, None), "int4": (4, None, None), "int4-narrow": (4, 4, 4), "int8": (8, 16, 16)}


def config_of(fmt: str) -> MossConfig:
    from dataclasses import replace

    wbits, head, embed = FORMATS[fmt]
    return layout.resolved(replace(BASE, wbits=wbits), head_width=head, embed_width=embed)


def _groups(config: MossConfig, rng: np.random.Generator) -> dict:
    out = {}
    for g in layout.all_groups(config):
        bits = layout.group_bits(config, g)
        arrays = {}
        for name, shape in layout.group_shapes(config, g).items():
            w = (rng.standard_normal(shape) * (0.5 if len(shape) == 1 else 0.08)).astype(np.float16)
            prefix = name[: -len(".weight")]
            if bits and name.endswith(".weight") and prefix in (*layout.QUANT_LINEARS, layout.PACKABLE.get(g)):
                # layers get act-order perms as GPTQ's do; lm_head and wte arange, as the converter writes
                perm = rng.permutation(shape[1]).astype(np.int32) if isinstance(g, int) else np.arange(shape[1], dtype=np.int32)
                q, s, z = gptq.quantize_rows(w[:, perm], bits, config.groupsize)
                arrays.update({f"{prefix}.perm": perm, f"{prefix}.qweight": q, f"{prefix}.scales": s, f"{prefix}.zeros": z})
            else:
                arrays[name] = w
        out[g] = arrays
    return out


def build_bases(root: Path, tokenizer_dir: Path | None = None) -> dict[str, Path]:
    """One store per format; with ``tokenizer_dir`` they hold its tokenizer files too (what the CLI
    needs before it loads any weight)."""
    out = {}
    for i, fmt in enumerate(FORMATS):
        config = config_of(fmt)
        source = {"id": f"test/{fmt}", "quantization": {"method": "rtn"}} if layout.packed_bits(config) else {"id": f"test/{fmt}"}
        out[fmt] = write_store_from_groups(root / fmt, config, _groups(config, np.random.default_rng(i)),
                                           tokenizer_dir=tokenizer_dir, source=source)
    return out


# ----------------------------------------------------------------------------- editing a store


def reseal(path: Path, only: tuple[str, ...] | None = None, fields: tuple[str, ...] = ("size", "sha256", FAST_HASH)) -> None:
    """Recompute the manifest's records of the files that changed (``fields`` of them) and its seal."""
    manifest = json.loads((path / MANIFEST).read_text())
    for name in list(manifest["files"]):
        if only is not None and name not in only or not (path / name).is_file():
            continue
        record = file_record(path / name)
        if any(manifest["files"][name].get(k) != record[k] for k in ("size", "sha256", FAST_HASH)):
            manifest["files"][name].update({k: record[k] for k in fields})
    (path / MANIFEST).write_bytes(sealed_manifest_bytes(manifest))


def edit_manifest(path: Path, edit: Callable[[dict], None], seal: bool = True) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    edit(manifest)
    data = sealed_manifest_bytes(manifest) if seal else (json.dumps(manifest, indent=2) + "\n").encode()
    (path / MANIFEST).write_bytes(data)


def edit_config(path: Path, **values) -> None:
    data = json.loads((path / "config.json").read_text())
    for k, v in values.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    (path / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def poke(path: Path, file: str, tensor: str, index: int, value) -> None:
    """Write ``value`` at flat element ``index`` of ``tensor`` in ``file`` (its own dtype)."""
    group = _group_of(file)
    store = _open_unchecked(path)
    offset, shape, dtype = store.tensor_offsets(group)[tensor]
    data = np.array([value]).astype(dtype) if not isinstance(value, bytes) else np.frombuffer(value, dtype)
    with open(path / file, "r+b") as f:
        f.seek(offset + index * np.dtype(dtype).itemsize)
        f.write(data.tobytes())


def fill(path: Path, file: str, tensor: str, value) -> None:
    store = _open_unchecked(path)
    offset, shape, dtype = store.tensor_offsets(_group_of(file))[tensor]
    with open(path / file, "r+b") as f:
        f.seek(offset)
        f.write(np.full(shape, value).astype(dtype).tobytes())


def read_header(file: Path) -> tuple[int, dict, bytes]:
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n]), raw[8 + n :]


def edit_header(file: str, edit: Callable[[dict], None], length_delta: int = 0):
    """A case that edits a group file's parsed header; the header keeps its length (so the data
    stays 64-byte aligned) unless the edit needs more room, or ``length_delta`` moves the data."""

    def apply(path: Path) -> None:
        n, header, data = read_header(path / file)
        edit(header)
        text = json.dumps(header, separators=(",", ":")).encode()
        if length_delta:
            n += length_delta
        while len(text) > n:
            n += 64
        (path / file).write_bytes(struct.pack("<Q", n) + text + b" " * (n - len(text)) + data)

    return apply


def _group_of(file: str) -> layout.Group:
    stem = file.split(".")[0]
    return int(stem.split("_")[1]) if stem.startswith("layer_") else stem


def _open_unchecked(path: Path) -> Store:
    """The store's offsets as the base store has them (the base is valid; cases edit bytes later)."""
    config = MossConfig.from_json_file(path / "config.json")
    return Store(path, config, json.loads((path / MANIFEST).read_text()))


@contextlib.contextmanager
def crafted(path: Path, case: "Case") -> Iterator[Path]:
    """Apply ``case`` to the store at ``path`` and re-seal it as an attacker would; restore on exit."""
    before = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
    changed = set(before)  # until the case is applied, anything may have changed
    try:
        case.apply(path)
        changed = {p.name for p in path.iterdir() if not p.is_file() or before.get(p.name) != p.read_bytes()}
        if case.reseal:
            reseal(path, only=tuple(changed), fields=case.reseal)
        changed.add(MANIFEST)
        yield path
    finally:
        for name in changed:
            if name not in before:
                (path / name).unlink()
            elif not (path / name).is_file() or (path / name).read_bytes() != before[name]:
                (path / name).write_bytes(before[name])


# ----------------------------------------------------------------------------- the families


@dataclass
class Case:
    name: str
    fmt: str
    file: str  # the file the refusal must name
    check: str | None  # the store_check check it must name (None: refused by the manifest/hash checks)
    apply: Callable[[Path], None] = field(repr=False)
    reseal: tuple[str, ...] | None = ("size", "sha256", FAST_HASH)
    runs_kernels: bool = False  # a value the kernels would index or compute with: also loaded in a child
    tensor: str = ""  # the tensor a value case edits


def _offsets(bases: dict[str, Path], fmt: str) -> dict[layout.Group, dict]:
    store = Store.open(bases[fmt])
    return {g: store.tensor_offsets(g) for g in layout.all_groups(store.config)}


def value_cases(bases: dict[str, Path]) -> list[Case]:
    """perm / scales / zeros / finite: every such tensor of every group, of every format, each bad
    value at one of the first, the last and a random element in turn."""
    out = []
    for fmt in FORMATS:
        config = config_of(fmt)
        rng = np.random.default_rng(len(out))
        for g, offsets in _offsets(bases, fmt).items():
            file = layout.group_file(g)
            bits = layout.group_bits(config, g)
            for name, (_, shape, dtype) in offsets.items():
                size = int(np.prod(shape))
                spots = [0, size - 1, int(rng.integers(size))]
                at = lambda i: spots[i % 3]  # noqa: E731
                if name.endswith(".perm"):
                    k = shape[0]
                    bad = {"K": k, "K+1": k + 1, "2^31-1": 2**31 - 1, "-1": -1, "-2^31": -(2**31), "40000": 40000}
                    bad_values = [(label, value, "perm") for label, value in bad.items()]
                elif name.endswith(".scales"):
                    bad_values = [(label, value, "scales") for label, value in (("NaN", np.nan), ("+inf", np.inf), ("-inf", -np.inf))]
                elif name.endswith(".zeros"):
                    top = float(1 << bits)
                    bad_values = [(label, value, "zeros") for label, value in (("-1", -1.0), ("2^bits+1", top + 1),
                                                                            ("2^bits+0.5", top + 0.5), ("NaN", np.nan),
                                                                            ("inf", np.inf), ("65504", 65504.0))]
                elif dtype == "float16" and len(shape) == 1:
                    bad_values = [(label, value, "finite") for label, value in (("NaN", np.nan), ("inf", np.inf))]
                else:
                    continue
                for i, (label, value, check) in enumerate(bad_values):
                    out.append(Case(f"{fmt} {file} {name}[{at(i)}] = {label}", fmt, file, check,
                                    lambda p, f=file, n=name, a=at(i), v=value: poke(p, f, n, a, v),
                                    runs_kernels=check != "finite", tensor=name))
                if name.endswith(".perm"):
                    out.append(Case(f"{fmt} {file} {name} all zeros", fmt, file, "perm",
                                    lambda p, f=file, n=name: fill(p, f, n, 0), runs_kernels=True, tensor=name))
                    out.append(Case(f"{fmt} {file} {name} a value twice", fmt, file, "perm",
                                    lambda p, f=file, n=name, a=int(rng.integers(shape[0] - 1)): _duplicate(p, f, n, a),
                                    runs_kernels=True, tensor=name))
    return out


def _duplicate(path: Path, file: str, name: str, at: int) -> None:
    store = _open_unchecked(path)
    offset, shape, dtype = store.tensor_offsets(_group_of(file))[name]
    with open(path / file, "rb") as f:
        f.seek(offset)
        perm = np.frombuffer(f.read(shape[0] * 4), np.int32).copy()
    perm[at + 1] = perm[at]
    poke(path, file, name, 0, perm.tobytes())


def header_cases(bases: dict[str, Path]) -> list[Case]:
    """identity and layout: every group file of every format."""
    out = []
    for fmt in FORMATS:
        groups = layout.all_groups(config_of(fmt))
        for g in groups:
            file = layout.group_file(g)
            other = groups[(groups.index(g) + 1) % len(groups)]
            meta = lambda key, value: (lambda h: h["__metadata__"].__setitem__(key, value))  # noqa: E731
            packed = any(dt != "float16" for _, dt in layout.group_tensors(config_of(fmt), g).values())
            out += [
                Case(f"{fmt} {file} metadata names group {other}", fmt, file, "identity",
                     edit_header(file, meta("group", str(other)))),
                Case(f"{fmt} {file} metadata format other", fmt, file, "identity", edit_header(file, meta("format", "pt"))),
                Case(f"{fmt} {file} metadata dtype flipped", fmt, file, "identity",
                     edit_header(file, meta("dtype", "float16" if packed else "packed"))),
                Case(f"{fmt} {file} metadata dropped", fmt, file, "identity", edit_header(file, lambda h: h.pop("__metadata__"))),
                Case(f"{fmt} {file} data start off the 64-byte boundary", fmt, file, "layout",
                     edit_header(file, lambda h: None, length_delta=8)),
            ]
            offsets = _offsets(bases, fmt)[g]
            names = list(offsets)
            for name in names:
                _, shape, dtype = offsets[name]
                out.append(Case(f"{fmt} {file} {name} renamed", fmt, file, "layout",
                                edit_header(file, lambda h, n=name: h.__setitem__(n + "x", h.pop(n)))))
                if len(shape) == 2 and shape[0] != shape[1]:
                    out.append(Case(f"{fmt} {file} {name} shape transposed", fmt, file, "layout",
                                    edit_header(file, lambda h, n=name: h[n].__setitem__("shape", h[n]["shape"][::-1]))))
                other_dtype = {"float16": "BF16", "int32": "F32", "uint8": "I8"}[dtype]
                out.append(Case(f"{fmt} {file} {name} dtype {other_dtype}", fmt, file, "layout",
                                edit_header(file, lambda h, n=name, d=other_dtype: h[n].__setitem__("dtype", d))))
            same = [(a, b) for a in names for b in names if a < b and offsets[a][1:] == offsets[b][1:]]
            if same:
                a, b = same[0]
                out.append(Case(f"{fmt} {file} {a} and {b} swapped", fmt, file, "layout",
                                edit_header(file, lambda h, a=a, b=b: _swap_entries(h, a, b))))
        # whole files swapped between groups of the same size: each one's metadata names the other
        same_size = [(a, b) for a in groups for b in groups if str(a) < str(b) and
                     (bases[fmt] / layout.group_file(a)).stat().st_size == (bases[fmt] / layout.group_file(b)).stat().st_size]
        for a, b in same_size:
            out.append(Case(f"{fmt} {layout.group_file(a)} and {layout.group_file(b)} swapped", fmt,
                            layout.group_file(a), "identity", lambda p, a=a, b=b: _swap_files(p, a, b)))
    return out


def _swap_entries(header: dict, a: str, b: str) -> None:
    header[a], header[b] = header[b], header[a]


def _swap_files(path: Path, a: layout.Group, b: layout.Group) -> None:
    fa, fb = path / layout.group_file(a), path / layout.group_file(b)
    da, db = fa.read_bytes(), fb.read_bytes()
    fa.write_bytes(db)
    fb.write_bytes(da)


def width_cases(bases: dict[str, Path]) -> list[Case]:
    """Packed widths and the config: a layer of another width, wbits/groupsize/head widths edited."""
    out = []
    int8_layer = (bases["int8"] / "layer_001.safetensors").read_bytes()
    int4_layer = (bases["int4"] / "layer_001.safetensors").read_bytes()
    fp16_layer = (bases["fp16"] / "layer_001.safetensors").read_bytes()
    put = lambda data: (lambda p: (p / "layer_001.safetensors").write_bytes(data))  # noqa: E731
    out += [
        Case("int4 store with an int8 layer", "int4", "layer_001.safetensors", "layout", put(int8_layer)),
        Case("int4-narrow store with an int8 layer", "int4-narrow", "layer_001.safetensors", "layout", put(int8_layer)),
        Case("int8 store with an int4 layer", "int8", "layer_001.safetensors", "layout", put(int4_layer)),
        Case("int4 store with an fp16 layer", "int4", "layer_001.safetensors", "identity", put(fp16_layer)),
        Case("fp16 store with an int4 layer", "fp16", "layer_001.safetensors", "identity", put(int4_layer)),
    ]
    for fmt, wbits in (("int4", 8), ("int8", 4), ("int4-narrow", 8)):
        out.append(Case(f"{fmt} config.json wbits {wbits}", fmt, "config.json", "config",
                        lambda p, w=wbits: edit_config(p, wbits=w)))
        out.append(Case(f"{fmt} config.json and manifest wbits {wbits}", fmt, "layer_000.safetensors", "layout",
                        lambda p, w=wbits: (edit_config(p, wbits=w), edit_manifest(p, lambda m: m["packed"].__setitem__("bits", w)))))
        for gs in (0, -1, 16, 64):
            out.append(Case(f"{fmt} config.json groupsize {gs}", fmt, "config.json", "config",
                            lambda p, g=gs: edit_config(p, groupsize=g)))
        first_packed = "layer_000.safetensors" if fmt == "int8" else "embed.safetensors"  # int8's wte is fp16
        out.append(Case(f"{fmt} config.json and manifest groupsize 16", fmt, first_packed, "layout",
                        lambda p: (edit_config(p, groupsize=16), edit_manifest(p, _group_size(16)))))
        out.append(Case(f"{fmt} config.json wbits 16", fmt, "config.json", "config", lambda p: edit_config(p, wbits=16)))
        out.append(Case(f"{fmt} config.json wbits 32, manifest packed", fmt, "config.json", "config",
                        lambda p: edit_config(p, wbits=32, head_wbits=None, embed_wbits=None)))
    # lm_head / wte widths: config and manifest edited together, so the files disagree
    # lm_head / wte widths: config and manifest edited together, so the files disagree (an fp16
    # head claimed packed fails its identity first: the metadata says float16)
    for fmt, head, check in (("int4", 4, "layout"), ("int4-narrow", 8, "layout"), ("int8", 8, "identity"),
                             ("int4", 32, "identity")):
        out.append(Case(f"{fmt} lm_head width edited to {head}", fmt, "head.safetensors", check,
                        lambda p, h=head: _set_width(p, "head_wbits", "lm_head", h)))
    for fmt, embed, check in (("int4", 4, "layout"), ("int8", 8, "identity"), ("int4-narrow", 32, "identity")):
        out.append(Case(f"{fmt} wte width edited to {embed}", fmt, "embed.safetensors", check,
                        lambda p, e=embed: _set_width(p, "embed_wbits", "wte", e)))
    out += [
        Case("fp16 config.json wbits 4", "fp16", "config.json", "config", lambda p: edit_config(p, wbits=4)),
        Case("fp16 config.json head_wbits 8", "fp16", "config.json", "config", lambda p: edit_config(p, head_wbits=8)),
        Case("fp16 config.json model_type codegen", "fp16", "config.json", "config", lambda p: edit_config(p, model_type="codegen")),
        Case("int4 config.json model_type codegen", "int4", "config.json", "config", lambda p: edit_config(p, model_type="codegen")),
        Case("fp16 config.json n_embd 32 (same store)", "fp16", "embed.safetensors", "layout",
             lambda p: edit_config(p, n_embd=32)),
        Case("int4 config.json n_inner 128", "int4", "layer_000.safetensors", "layout", lambda p: edit_config(p, n_inner=128)),
        Case("int4 config.json vocab_size 64", "int4", "embed.safetensors", "layout", lambda p: edit_config(p, vocab_size=64)),
    ]
    return out


def _group_size(size: int) -> Callable[[dict], None]:
    def edit(manifest: dict) -> None:
        manifest["packed"]["group_size"] = size
        for key in ("lm_head", "wte"):
            if isinstance(manifest["packed"][key], dict):
                manifest["packed"][key]["group_size"] = size

    return edit


def _set_width(path: Path, field_name: str, entry: str, bits: int) -> None:
    edit_config(path, **{field_name: bits})
    record = {"bits": bits, "group_size": BASE.groupsize, "scheme": "rtn"} if bits != 32 else "float16"
    edit_manifest(path, lambda m: m["packed"].__setitem__(entry, record))


def manifest_cases(bases: dict[str, Path]) -> list[Case]:
    """Required fields of jmoss.json deleted or changed, and downgrades to a manifest without hashes."""
    out = []
    fixed = {"format": "other", "dtype": "bfloat16", "qkv_layout": "q|v|k", "data_alignment": 32, "model_type": 7,
             "source": "x", "groups": [], "checksum": None}
    for fmt in ("fp16", "int4"):
        for key, value in fixed.items():
            # (the seal is recomputed over what is left; a deleted seal stays deleted)
            out.append(Case(f"{fmt} manifest {key} deleted", fmt, MANIFEST, "manifest",
                            lambda p, k=key: edit_manifest(p, lambda m: m.pop(k), seal=k != "checksum"), reseal=None))
            if value is not None:
                out.append(Case(f"{fmt} manifest {key} = {value!r}", fmt, MANIFEST, "manifest",
                                lambda p, k=key, v=value: edit_manifest(p, lambda m: m.__setitem__(k, v)), reseal=None))
        for name in ("config.json", "layer_000.safetensors", "head.safetensors"):
            out.append(Case(f"{fmt} manifest {name} without its fast hash", fmt, MANIFEST, "manifest",
                            lambda p, n=name: edit_manifest(p, lambda m: m["files"][n].pop(FAST_HASH)), reseal=None))
        out.append(Case(f"{fmt} downgrade: no seal, no fast hashes, a weight byte flipped", fmt, MANIFEST, "manifest",
                        lambda p: _downgrade(p), reseal=None))
        out.append(Case(f"{fmt} a weight byte flipped, only sha256 recomputed", fmt, "layer_001.safetensors", None,
                        lambda p: _flip(p, "layer_001.safetensors"), reseal=("size", "sha256")))
    out.append(Case("int4 manifest packed.layout edited", "int4", MANIFEST, "manifest",
                    lambda p: edit_manifest(p, lambda m: m["packed"].__setitem__("layout", "cols")), reseal=None))
    return out


def _flip(path: Path, file: str) -> None:
    data = bytearray((path / file).read_bytes())
    data[-3] ^= 0x10
    (path / file).write_bytes(bytes(data))


def _downgrade(path: Path) -> None:
    _flip(path, "layer_001.safetensors")

    def strip(m: dict) -> None:
        m.pop("checksum")
        for record in m["files"].values():
            record.pop(FAST_HASH)
        m["files"]["layer_001.safetensors"].update({k: file_record(path / "layer_001.safetensors")[k]
                                                    for k in ("size", "sha256")})

    edit_manifest(path, strip, seal=False)


def cases(bases: dict[str, Path]) -> list[Case]:
    return value_cases(bases) + header_cases(bases) + width_cases(bases) + manifest_cases(bases)


def child_cases(all_cases: list[Case]) -> list[Case]:
    """The cases a child loads with jmoss.load (the engines' own read paths, the kernels): of those
    that reach the kernels, the first of every tensor of every file of every format (the rest of
    each tensor's family differs only in the value, which the in-process tests cover)."""
    seen, out = set(), []
    for case in all_cases:
        key = (case.fmt, case.file, case.tensor)
        if case.runs_kernels and key not in seen:
            seen.add(key)
            out.append(case)
    return out


# ----------------------------------------------------------------------------- the child process

if __name__ == "__main__":
    # python tests/crafted_stores.py ROOT [--bypass-value-checks]: load every child case (all
    # resident, then streamed under the smallest budget), print one JSON line each.
    import jmoss
    from jmoss.errors import JmossError
    from jmoss.placement import plan_placement

    root, bypass = Path(sys.argv[1]), "--bypass-value-checks" in sys.argv
    if bypass:  # the kernels' own guard alone: nothing may crash, the output is NaN
        from jmoss import store_check

        store_check.check_group_values = lambda *a, **k: None
    bases = {fmt: root / fmt for fmt in FORMATS}
    ids = np.arange(12).reshape(1, 12) % BASE.vocab_size
    for case in child_cases(cases(bases)):
        path = bases[case.fmt]
        for where in ("resident", "streamed"):
            with crafted(path, case):
                budget = None
                if where == "streamed":
                    config = MossConfig.from_json_file(path / "config.json")
                    budget = plan_placement(config, device="cpu", device_memory=1 << 40, host_memory=None,
                                            max_seq_len=12).minimum_device_bytes
                try:
                    logits = jmoss.load(str(path), device="cpu", device_memory=budget, max_seq_len=12).logits(ids)
                    result = {"loaded": True, "finite": bool(np.isfinite(logits).all())}
                except JmossError as exc:
                    result = {"loaded": False, "error": str(exc)}
            print(json.dumps({"case": case.name, "where": where, **result}), flush=True)
    os._exit(0)  # skip interpreter teardown: jittor's atexit hooks are not what is tested
