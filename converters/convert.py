"""`jmoss convert`: stream a MOSS/CodeGen checkpoint, tensor by tensor, into a jmoss store.

Data flow: ``sources.resolve`` finds the files (local folder or Hugging Face cache);
``Source.iter_tensors`` describes each tensor without reading it; each tensor is then mapped
(mmap), cast to fp16 (GPTQ parts are dequantized, see gptq.py), re-laid out (qkv rows, see
layout.py) and written in bounded row chunks at its fixed offset in its group's ``.tmp`` file
(the header is known from the config before any data arrives). When a group has all its
tensors, the file is fsynced, read back and checked, renamed into place, and recorded in the
resume journal (``store.JOURNAL``). A re-run after a crash or Ctrl-C re-hashes the recorded
groups and skips them (and any shard that only holds them). ``jmoss.json`` is written last.
A re-run on a finished store re-hashes it and repairs whatever no longer matches its manifest.

Peak memory is one source tensor's mapped pages plus one chunk (16 MiB) of conversion
buffers, or for GPTQ one Linear's packed tensors: never a shard or the model.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from jmoss import layout
from jmoss.config import MossConfig
from jmoss.converters import gptq
from jmoss.converters.sources import GPTQ_SUFFIXES, Source, SourceTensor, resolve
from jmoss.errors import CheckpointError, StoreError
from jmoss.store import (
    FAST_HASH,
    JOURNAL,
    TOKENIZER_FILES,
    MANIFEST,
    GroupWriter,
    is_checkpoint_dir,
    atomic_write_bytes,
    check_files,
    default_store_dir,
    default_store_dir_for_local,
    finalize_store,
    sha256_file,
)

CHUNK_BYTES = 16 << 20  # fp16 bytes produced per write: bounds the conversion buffers
JOURNAL_VERSION = 1


class _Journal:
    """Groups already written and verified, keyed to the exact source and config."""

    def __init__(self, out: Path, identity: dict[str, Any]) -> None:
        self.path = out / JOURNAL
        self.identity = identity
        self.groups: dict[str, dict[str, Any]] = {}
        self.gptq_bits: set[int] = set()  # bit widths met so far (for the manifest of a resumed run)
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return
        if not isinstance(data, dict) or data.get("version") != JOURNAL_VERSION or data.get("identity") != identity:
            return
        groups, bits = data.get("groups"), data.get("gptq_bits")
        if isinstance(groups, dict) and all(_valid_record(r) for r in groups.values()):
            self.groups = groups
            if isinstance(bits, list) and all(b in gptq.SUPPORTED_BITS for b in bits):
                self.gptq_bits = set(bits)

    def verified(self, out: Path, config: MossConfig, hashed: frozenset[str] = frozenset()) -> dict[layout.Group, dict[str, Any]]:
        """Recorded groups whose files still hash to what was recorded (``hashed``: just checked)."""
        done = {}
        for group in layout.all_groups(config):
            record = self.groups.get(str(group))
            path = out / layout.group_file(group)
            if record and path.is_file() and path.stat().st_size == record["size"] and (
                str(group) in hashed or sha256_file(path) == record["sha256"]
            ):
                done[group] = record
            else:
                self.groups.pop(str(group), None)
        return done

    def record(self, group: layout.Group, record: dict[str, Any], gptq_bits: set[int]) -> None:
        self.groups[str(group)] = record
        self.gptq_bits |= gptq_bits
        self.save()

    def save(self) -> None:
        data = {"version": JOURNAL_VERSION, "identity": self.identity, "groups": self.groups, "gptq_bits": sorted(self.gptq_bits)}
        atomic_write_bytes(self.path, json.dumps(data, indent=1).encode())


def _valid_record(record: Any) -> bool:
    return isinstance(record, dict) and isinstance(record.get("size"), int) and isinstance(record.get("sha256"), str)


def _to_fp16(chunk: np.ndarray, dtype: str, name: str) -> np.ndarray:
    if dtype == "float16":
        return np.ascontiguousarray(chunk)
    if dtype == "bfloat16":  # bf16 is the top half of an fp32
        wide = (chunk.astype(np.uint32) << 16).view(np.float32)
    elif dtype in ("float32", "float64"):
        wide = chunk
    else:
        raise CheckpointError(f"tensor {name} has dtype {dtype}; a MOSS/CodeGen weight is floating point")
    with np.errstate(over="ignore"):  # an overflow is reported just below, as an error
        out = wide.astype(np.float16)
    if np.isinf(out).any() and not np.isinf(wide).any():
        raise CheckpointError(f"tensor {name} has values beyond the fp16 range (|x| > 65504); jmoss stores fp16")
    return out


class _Converter:
    """Routes source tensors to group writers; finishes each group as soon as it is complete."""

    def __init__(self, out: Path, config: MossConfig, pending: list[layout.Group], journal: _Journal, bar: Any) -> None:
        self.out, self.config, self.journal, self.bar = out, config, journal, bar
        self.pending = set(pending)
        self.writers: dict[layout.Group, GroupWriter] = {}
        self.records: dict[layout.Group, dict[str, Any]] = {}
        self.gptq_parts: dict[str, dict[str, np.ndarray]] = {}
        self.gptq_bits: set[int] = set()
        self.qkv_order = layout.qkv_row_order(config)
        self.seen: set[str] = set()
        self.claimed: dict[tuple[layout.Group, str], tuple[str, str]] = {}  # target -> (kind, first source name)

    def target(self, name: str) -> tuple[layout.Group, str] | None:
        """(group, store name) of a source tensor name; None for buffers the store drops."""
        weight_name = name
        for suffix in GPTQ_SUFFIXES:
            if name.endswith(suffix):
                weight_name = name[: -len(suffix)] + ".weight"
        try:
            return layout.map_hf_name(weight_name, self.config)
        except KeyError:
            raise CheckpointError(
                f"tensor {name} is not part of a MOSS/CodeGen model with n_layer={self.config.n_layer}; "
                "the checkpoint is another architecture or does not match its config.json"
            ) from None

    def wanted(self, name: str) -> bool:
        try:
            target = self.target(name)
        except CheckpointError:
            return True  # open the file so the error names the tensor
        return target is not None and target[0] in self.pending

    def writer(self, group: layout.Group) -> GroupWriter:
        if group not in self.writers:
            self.writers[group] = GroupWriter(self.out, self.config, group)
        return self.writers[group]

    def add(self, tensor: SourceTensor) -> None:
        if tensor.name in self.seen:  # in two files: which copy wins must not depend on file order
            raise CheckpointError(f"tensor {tensor.name[:100]} appears twice in the checkpoint (again in {tensor.file.name})")
        self.seen.add(tensor.name)
        target = self.target(tensor.name)
        if target is not None:
            self._claim(tensor, target)
        if target is None or target[0] not in self.pending:
            return  # ignored buffer (causal_mask) or an already-verified group: bytes never read
        group, store_name = target
        if tensor.name.endswith(GPTQ_SUFFIXES):
            self._add_gptq_part(tensor, group, store_name)
            return
        expected = layout.group_shapes(self.config, group)[store_name]
        bits = layout.group_bits(self.config, group)
        packs = store_name[: -len(".weight")] in (*layout.QUANT_LINEARS, layout.PACKABLE.get(group))
        if tuple(tensor.shape) == expected and bits and packs:
            with tensor.open() as array:  # --quantize: round-to-nearest, group-wise (gptq.quantize_rows)
                self._write_packed(
                    group, store_name[: -len(".weight")], np.arange(expected[1], dtype=np.int32), expected[0],
                    layout.packed_row_bytes(expected[1], bits),
                    lambda rows: gptq.quantize_rows(_to_fp16(array[rows], tensor.dtype, tensor.name), bits,
                                                    self.config.groupsize))
                del array
            return
        if tuple(tensor.shape) != expected:
            raise CheckpointError(
                f"tensor {tensor.name} in {tensor.file.name} has shape {list(tensor.shape)}, but config.json "
                f"(n_embd={self.config.n_embd}, n_layer={self.config.n_layer}, vocab_size={self.config.vocab_size}) "
                f"says {list(expected)}; the config does not belong to these weights"
            )
        order = self.qkv_order if store_name == "attn.qkv.weight" else None
        with tensor.open() as array:
            self._write(group, store_name, expected, lambda rows: _to_fp16(array[rows], tensor.dtype, tensor.name), order)
            del array  # drop the view before the mapping closes: an exported buffer cannot be unmapped

    def _claim(self, tensor: SourceTensor, target: tuple[layout.Group, str]) -> None:
        """Refuse a second source for one store tensor (a Linear's fp16 weight beside its GPTQ
        parts, GPTQ parts for a tensor that is not a Linear), by name, before any byte is read:
        otherwise whichever came second would be dropped unread once its group was written."""
        group, store_name = target
        gptq_part = tensor.name.endswith(GPTQ_SUFFIXES)
        prefix = store_name[: -len(".weight")]
        if gptq_part and not (store_name.endswith(".weight") and prefix in (*layout.QUANT_LINEARS, "lm_head")):
            raise CheckpointError(f"GPTQ tensor {tensor.name[:100]} stands for {store_name}, which is not a quantizable "
                                  "Linear of MOSS/CodeGen; the checkpoint is corrupt or of another architecture")
        kind = "GPTQ parts" if gptq_part else "weight"
        first = self.claimed.setdefault(target, (kind, tensor.name))
        if first[0] != kind:
            label = f"layer {group}" if isinstance(group, int) else group
            raise CheckpointError(
                f"{tensor.name[:100]} and {first[1][:100]} both give {store_name} of {label} (an fp16 weight and "
                "GPTQ parts of one Linear); the checkpoint is inconsistent: keep one of them"
            )

    def _check_gptq_part(self, tensor: SourceTensor, suffix: str, out_features: int, in_features: int) -> None:
        """Shape and dtype of one packed part against the Linear the config implies, before its
        bytes are copied (a huge shape over a stride-0 storage would otherwise be materialized)."""
        shape, dtype = tuple(tensor.shape), tensor.dtype
        bits_ok = lambda packed, full: any(32 * packed == full * b for b in gptq.SUPPORTED_BITS)  # noqa: E731
        if suffix == "qweight":
            ok = dtype == "int32" and len(shape) == 2 and shape[1] == out_features and bits_ok(shape[0], in_features)
            want = f"int32 [in_features*bits/32, {out_features}] (in_features {in_features})"
        elif suffix == "qzeros":
            ok = dtype == "int32" and len(shape) == 2 and 1 <= shape[0] <= in_features and bits_ok(shape[1], out_features)
            want = f"int32 [groups <= {in_features}, {out_features}*bits/32]"
        elif suffix == "scales":
            ok = dtype in ("float16", "float32", "bfloat16") and len(shape) == 2 and 1 <= shape[0] <= in_features and shape[1] == out_features
            want = f"float [groups <= {in_features}, {out_features}]"
        else:  # g_idx
            ok = dtype in ("int32", "int64") and shape == (in_features,)
            want = f"int32 [{in_features}]"
        if not ok:
            raise CheckpointError(
                f"GPTQ tensor {tensor.name} in {tensor.file.name} is {dtype} {list(shape)[:8]}, but config.json "
                f"implies {want}; the checkpoint is corrupt or does not match its config"
            )

    def _add_gptq_part(self, tensor: SourceTensor, group: layout.Group, store_name: str) -> None:
        base, suffix = tensor.name.rsplit(".", 1)
        out_features, in_features = layout.group_shapes(self.config, group)[store_name]
        self._check_gptq_part(tensor, suffix, out_features, in_features)
        if suffix in self.gptq_parts.get(base, {}):
            raise CheckpointError(f"GPTQ tensor {tensor.name} appears twice in the checkpoint")
        with tensor.open() as array:
            part = np.array(array)  # packed parts are small; the fp16 result is written in chunks
            del array
        parts = self.gptq_parts.setdefault(base, {})
        parts[suffix] = part
        if len(parts) < 4:
            return
        del self.gptq_parts[base]
        if parts["scales"].dtype == np.uint16:  # scales saved as bf16
            parts["scales"] = (parts["scales"].astype(np.uint32) << 16).view(np.float32)
        spec = gptq.infer_spec(base, parts["qweight"], parts["qzeros"], parts["scales"], parts["g_idx"])
        self.gptq_bits.add(spec.bits)
        expected = layout.group_shapes(self.config, group)[store_name]
        if (spec.out_features, spec.in_features) != expected:
            raise CheckpointError(
                f"{base} dequantizes to [{spec.out_features}, {spec.in_features}] but config.json says {list(expected)}"
            )
        zeros = gptq.unpack_zeros(parts["qzeros"], spec.bits)
        if layout.packed_bits(self.config):  # keep the integers (store format 2)
            if spec.bits != self.config.wbits:
                raise CheckpointError(f"{base} is {spec.bits}-bit but other layers are {self.config.wbits}-bit; "
                                      "a packed store has one width: convert with --dequantize")
            perm = gptq.act_order_perm(base, parts["g_idx"], self.config.groupsize)
            self._write_packed(
                group, store_name[: -len(".weight")], perm, spec.out_features,
                layout.packed_row_bytes(spec.in_features, spec.bits),
                lambda rows: gptq.packed_rows(parts["qweight"], zeros, parts["scales"], perm, spec, rows))
            return
        order = self.qkv_order if store_name == "attn.qkv.weight" else None
        self._write(
            group,
            store_name,
            expected,
            lambda rows: gptq.dequantize_rows(parts["qweight"], zeros, parts["scales"], parts["g_idx"], spec, rows),
            order,
        )

    def _write(self, group, store_name: str, shape: tuple[int, ...], produce, order: np.ndarray | None) -> None:
        """Write a tensor in chunks of rows; ``produce(rows)`` returns fp16 rows (slice or index array)."""
        writer = self.writer(group)
        if writer.rows_written(store_name):
            raise CheckpointError(f"tensor {store_name} of group {group!r} appears twice in the checkpoint")
        row_bytes = 2 * int(np.prod(shape[1:], dtype=np.int64))
        step = max(1, CHUNK_BYTES // row_bytes)
        for start in range(0, shape[0], step):
            stop = min(start + step, shape[0])
            rows = order[start:stop] if order is not None else slice(start, stop)
            chunk = produce(rows)
            writer.write_rows(store_name, start, chunk)
            self.bar.update(chunk.nbytes)
        self._finish_if_complete(group)

    def _finish_if_complete(self, group) -> None:
        writer = self.writers[group]
        if writer.complete:
            self.records[group] = writer.finish()
            self.journal.record(group, self.records[group], self.gptq_bits)
            del self.writers[group]
            self.pending.discard(group)

    def _write_packed(self, group, prefix: str, perm: np.ndarray, n_out: int, row_bytes: int, produce) -> None:
        """Write a packed Linear (store format 2): perm, then qweight/scales/zeros in row chunks.

        ``produce(rows)`` returns (qweight uint8, scales fp16, zeros fp16) for output rows
        ``rows`` (a slice, or the qkv row order's indices): only one chunk is ever unpacked."""
        writer = self.writer(group)
        if writer.rows_written(f"{prefix}.qweight"):
            raise CheckpointError(f"tensor {prefix} of group {group!r} appears twice in the checkpoint")
        writer.write_rows(f"{prefix}.perm", 0, perm.astype(np.int32))
        order = self.qkv_order if prefix == "attn.qkv" else None
        k_in = perm.shape[0]
        step = max(1, CHUNK_BYTES // max(1, 8 * k_in))  # bounds the unpacked int/fp32 temporaries
        for start in range(0, n_out, step):
            stop = min(start + step, n_out)
            rows = order[start:stop] if order is not None else slice(start, stop)
            q, sc, zp = produce(rows)
            writer.write_rows(f"{prefix}.qweight", start, q)
            writer.write_rows(f"{prefix}.scales", start, sc)
            writer.write_rows(f"{prefix}.zeros", start, zp)
            self.bar.update(q.nbytes + sc.nbytes + zp.nbytes)
        self._finish_if_complete(group)

    def check_complete(self) -> None:
        problems = []
        for base, parts in self.gptq_parts.items():
            problems.append(f"{base}: has {', '.join(sorted(parts))}, lacks {', '.join(sorted(set(('qweight', 'qzeros', 'scales', 'g_idx')) - set(parts)))}")
        for group in layout.all_groups(self.config):
            if group not in self.pending:
                continue
            writer = self.writers.get(group)
            missing = writer.missing() if writer else list(layout.group_tensors(self.config, group))
            label = f"layer {group}" if isinstance(group, int) else group
            problems.append(f"{label}: {', '.join(missing)}")
        if problems:
            raise CheckpointError(
                "the checkpoint lacks tensors the config requires (a shard missing from the index, or an "
                "incomplete download):\n  " + "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
            )

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()
        self.writers.clear()


def _existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _check_finished_store(
    out: Path, src: Source, config: MossConfig, described: dict[str, Any], progress: bool
) -> tuple[dict[str, dict[str, Any]], set[int]] | None:
    """Re-check a store that has a manifest before trusting it: None when it is intact.

    Otherwise returns the groups (journal records) whose size and sha256 still match, and the
    GPTQ bit widths recorded, so the caller rewrites only the rest. Sizes of every file are
    checked first, then the group files of the right size are hashed (the cost of a full
    `jmoss verify`: the files are read once). A manifest that cannot be parsed keeps nothing:
    no record says which bytes are right.
    """
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ValueError("no file list")
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        if progress:
            print(f"{out / MANIFEST} is damaged ({str(exc)[:200]}); converting {src.id} again")
        return {}, set()
    previous = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
    keys = ("id", "revision", "format")
    if {k: previous.get(k) for k in keys} != {k: described[k] for k in keys}:
        raise StoreError(
            f"{out} already holds a model converted from {previous.get('id')} (revision {previous.get('revision')}); "
            "choose another --out or delete that folder"
        )
    packed = manifest.get("packed") if isinstance(manifest.get("packed"), dict) else {}
    if packed.get("bits") != layout.packed_bits(config) or (
            layout.packed_bits(config) and {k: packed.get(k) for k in ("lm_head", "wte")} != layout.manifest_entry(config)):
        held = (f"{packed.get('bits')}-bit packed (lm_head {packed.get('lm_head', 'float16')}, wte "
                f"{packed.get('wte', 'float16')})" if packed.get("bits") else "fp16")
        raise StoreError(f"{out} already holds {src.id} as {held} weights; choose another --out for this "
                         "conversion or delete that folder")
    expected = {layout.group_file(g) for g in layout.all_groups(config)} | {"config.json"}
    expected |= {p.name for p in src.tokenizer_files}
    problems = check_files(out, manifest)
    problems.update({name: "not in the manifest" for name in expected - set(manifest["files"])})
    problems.update({str(name)[:100]: "not part of this store" for name in set(manifest["files"]) - expected})
    if not problems:
        if progress:
            print(f"{src.id} is already converted at {out}; all its files verified")
        return None
    if progress:
        print(f"{out} is damaged ({'; '.join(f'{n}: {p}' for n, p in problems.items())}); "
              "rewriting the damaged files")
    kept = {}
    for group in layout.all_groups(config):
        name = layout.group_file(group)
        record = manifest["files"].get(name)
        if name not in problems and _valid_record(record):
            kept[str(group)] = {k: record[k] for k in ("size", "sha256", FAST_HASH) if k in record}
    bits = previous.get("quantization", {}).get("bits", []) if isinstance(previous.get("quantization"), dict) else []
    return kept, {b for b in bits if b in gptq.SUPPORTED_BITS} if isinstance(bits, list) else set()


QUANTIZE_CHOICES = {"int8": 8, "int4": 4}


def _variant_options(src: Source, config: MossConfig, variant: str) -> tuple[str | None, bool]:
    """(quantize, dequantize) that turn this checkpoint into ``variant``."""
    if variant not in ("fp16", *QUANTIZE_CHOICES):
        raise CheckpointError(f"variant {variant!r}: choose fp16, int8 or int4")
    if not src.is_gptq():
        return (None if variant == "fp16" else variant), False
    if variant == "fp16":
        return None, True
    bits, _ = _gptq_format(src, config)
    if QUANTIZE_CHOICES[variant] != bits:
        raise CheckpointError(f"{src.id} is a {bits}-bit GPTQ checkpoint: it converts to int{bits} (kept as it is) "
                              f"or fp16, not {variant}")
    return None, False
QUANTIZE_GROUP = 128


def _gptq_format(src: Source, config: MossConfig) -> tuple[int, int]:
    """(bits, group size) of a GPTQ checkpoint, from the tensor shapes alone (no data is read).

    Bits come from qweight rows per input feature (moss-spec §2.6: never from config.wbits); the
    group size is config.groupsize when it gives every Linear's group count, else in / groups.
    """
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for tensor in src.iter_tensors():
        base, _, suffix = tensor.name.rpartition(".")
        if suffix in ("qweight", "scales", "g_idx"):
            shapes.setdefault(base, {})[suffix] = tuple(tensor.shape)
    bits, sizes = set(), []
    for base, parts in shapes.items():
        if len(parts) < 3 or not parts["g_idx"] or not parts["g_idx"][0]:
            continue  # check_complete names what is missing
        k_in, groups = parts["g_idx"][0], parts["scales"][0]
        bits.add(32 * parts["qweight"][0] // k_in)
        sizes.append((base, k_in, groups))
    if len(bits) != 1 or not bits <= set(layout.PACKED_BITS):
        raise CheckpointError(f"the GPTQ checkpoint has bit widths {sorted(bits)}; a packed store holds one of 4 or 8: "
                              "convert with --dequantize")
    gs = config.groupsize
    if gs <= 0 or any(-(-k // gs) != g for _, k, g in sizes):
        candidates = {k // g for _, k, g in sizes if k % g == 0}
        if len(candidates) != 1:
            raise CheckpointError("the GPTQ Linears have no common group size; convert with --dequantize")
        gs = candidates.pop()
    return bits.pop(), gs


def convert(source: str, out: str | Path | None = None, *, revision: str | None = None, progress: bool = True,
            dequantize: bool = False, quantize: str | None = None, head_bits: int | None = None,
            embed_bits: int | None = None, keep_head_fp16: bool = False, variant: str | None = None) -> Path:
    """Convert ``source`` (HF repo id or local folder) into a jmoss store; return the store path.

    A GPTQ int4/int8 checkpoint keeps its integers (a packed store, format 2) unless
    ``dequantize`` asks for fp16; ``quantize="int8"|"int4"`` packs an fp16/fp32/bf16 checkpoint
    by round-to-nearest per group of 128 inputs (``gptq.quantize_rows``). A packed store also packs
    lm_head and wte the same way, at ``head_bits`` and ``embed_bits`` (4, 8, or 16 = kept fp16;
    default 8 for both, whatever the layers' width); ``keep_head_fp16`` is both 16 (``jmoss.layout``).
    GPTQ layer integers are always kept exactly.
    Resumable: re-running the same command after an interruption keeps verified groups. On a
    finished store it re-checks every file (sizes, then sha256) and rewrites only damaged ones.
    ``variant`` ("fp16", "int8", "int4": ``jmoss pull NAME:VARIANT``) picks quantize/dequantize for
    whatever the checkpoint is. A conversion into another format than the checkpoint's own goes to
    its own default folder (``…--int4``), beside the plain one.
    """
    src: Source = resolve(source, revision)
    config = MossConfig.from_json_file(src.config_path)
    if variant is not None:
        quantize, dequantize = _variant_options(src, config, variant)
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise CheckpointError(f"--quantize {quantize!r}: choose int8 or int4")
    gptq_source = src.is_gptq()
    if quantize is not None:
        if gptq_source:
            raise CheckpointError(f"{src.id} is already a GPTQ checkpoint; convert it without --quantize "
                                  "(its integers are kept as they are)")
        config = replace(config, wbits=QUANTIZE_CHOICES[quantize], groupsize=QUANTIZE_GROUP)
    elif gptq_source and not dequantize:
        bits, group_size = _gptq_format(src, config)
        config = replace(config, wbits=bits, groupsize=group_size)
    else:
        config = replace(config, wbits=32)
    chosen = [flag for flag, given in (("--keep-head-fp16", keep_head_fp16), ("--head-bits", head_bits),
                                      ("--embed-bits", embed_bits)) if given]
    if chosen and not layout.packed_bits(config):
        raise CheckpointError(f"{chosen[0]} is for packed stores (a GPTQ checkpoint kept packed, or --quantize); "
                              "this store is fp16 throughout: leave the flag out")
    if keep_head_fp16 and {head_bits, embed_bits} - {None, 16}:
        raise CheckpointError("--keep-head-fp16 keeps lm_head and the embedding fp16 (it is --head-bits 16 "
                              "--embed-bits 16): give either it or the widths")
    config = layout.resolved(config, keep_head_fp16, head_width=head_bits, embed_width=embed_bits)
    if out is None:
        suffix = quantize or ("fp16" if dequantize and gptq_source else None)
        out = default_store_dir(src.id, suffix) if src.hub else default_store_dir_for_local(src.root, suffix)
    out = Path(out).expanduser()
    if out.resolve().is_relative_to(src.root.resolve()):
        where = "is a checkpoint folder (the source itself)" if out.resolve() == src.root.resolve() else f"is inside the checkpoint folder {src.root}"
        raise StoreError(f"--out {out} {where}; the store needs a folder of its own (or omit --out)")
    if out.exists() and is_checkpoint_dir(out):
        raise StoreError(f"--out {out} is a checkpoint folder; the store needs a folder of its own (or omit --out)")
    if not any(p.name in ("tokenizer.json", "vocab.json") for p in src.tokenizer_files):
        # weights alone convert fine, but chat/generate on text would fail at first use: say so now
        fix = (f"copy them into {src.root} and run this command again (only they are added)" if not src.hub
               else "the repo has none: token ids still work (model.logits, generate_tokens)")
        print(f"jmoss: warning: {src.id} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt): the "
              f"store will take token ids but no text; {fix}", file=sys.stderr, flush=True)
    described = src.describe()
    journal = _Journal(out, {"source": described, "config": config.to_dict()})
    hashed: frozenset[str] = frozenset()
    if (out / MANIFEST).exists():
        kept = _check_finished_store(out, src, config, described, progress)
        if kept is None:
            return out  # complete and every file verified: nothing to write
        journal.groups, journal.gptq_bits, hashed = kept[0], kept[1], frozenset(kept[0])
        journal.save()  # the journal, not the manifest, now says what is kept
        (out / MANIFEST).unlink()
    out.mkdir(parents=True, exist_ok=True)
    own = {layout.group_file(g) for g in layout.all_groups(config)} | {"config.json", MANIFEST, JOURNAL, *TOKENIZER_FILES}
    for name in own:  # only this converter's own leftovers: never a user's other *.tmp files
        stale = out / f"{name}.tmp"
        if stale.is_file() and not stale.is_symlink():
            stale.unlink()
    done = journal.verified(out, config, hashed)
    journal.save()
    pending = [g for g in layout.all_groups(config) if g not in done]
    remaining = sum(layout.group_nbytes(config, g) + 4096 for g in pending)
    free = shutil.disk_usage(_existing(out)).free
    if free < remaining:
        raise StoreError(
            f"not enough disk space at {out}: converting needs {remaining / 2**30:.2f} GiB more, "
            f"{free / 2**30:.2f} GiB is free; free some space or pass --out on another disk"
        )
    from tqdm import tqdm

    bar = tqdm(
        total=sum(layout.group_nbytes(config, g) for g in pending),
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"convert {Path(src.id).name}",
        disable=not progress,
    )
    converter = _Converter(out, config, pending, journal, bar)
    try:
        if pending:
            for tensor in src.iter_tensors(converter.wanted):
                converter.add(tensor)
        converter.check_complete()
    except BaseException:
        converter.abort()
        raise
    finally:
        bar.close()
    records = {**done, **converter.records}
    info = dict(described)
    bits = converter.gptq_bits | journal.gptq_bits
    if quantize is not None:
        info["quantization"] = {"method": "rtn", "bits": [config.wbits], "group_size": config.groupsize}
    elif bits and layout.packed_bits(config):
        info["quantization"] = {"method": "gptq", "bits": sorted(bits), "kept_packed": True}
    elif bits:
        info["quantization"] = {"method": "gptq", "bits": sorted(bits), "dequantized_to": "float16"}
    finalize_store(out, config, records, tokenizer_files=src.tokenizer_files, source=info)
    journal.path.unlink(missing_ok=True)
    return out
