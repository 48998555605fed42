"""Where stores live, how a name or path resolves to one, and the command that repairs one.

``resolve_model`` maps what a user types (a store folder, a converted checkpoint folder, a Hugging
Face repo id, ``NAME:VARIANT``) to a store directory; ``repair_hint`` is the sentence every store
error ends with.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from pathlib import Path
from typing import Any, Mapping

from jmoss import layout
from jmoss.errors import ModelNotFoundError, NotConvertedError
from jmoss.home import jmoss_home
from jmoss.store_format import JOURNAL, MANIFEST


VARIANTS = ("fp16", "int8", "int4")  # what `jmoss pull NAME:VARIANT` converts to (jmoss.models)


def split_variant(name: str) -> tuple[str, str | None]:
    """``"org/name:int4"`` -> ``("org/name", "int4")``; a name without a known variant is returned whole."""
    base, sep, variant = name.rpartition(":")
    return (base, variant) if sep and base and variant in VARIANTS else (name, None)


def _suffix(variant: str | None) -> str:
    return f"--{variant}" if variant else ""


def default_store_dir(repo_id: str, variant: str | None = None) -> Path:
    """``<jmoss home>/models/<org>--<name>`` for a Hugging Face repo id; ``…--int4`` (``--int8``,
    ``--fp16``) for a conversion into another format than the checkpoint's own, so that one can sit
    beside the other (Hub names never contain ``--``)."""
    parts = repo_id.strip("/").split("/")
    if not 1 <= len(parts) <= 2 or not all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", p) for p in parts):
        raise ModelNotFoundError(f"{repo_id!r} is not a Hugging Face repo id (expected 'org/name') nor an existing path")
    return jmoss_home() / "models" / ("--".join(parts) + _suffix(variant))


def stores_of_source(source: str | Path, models: Path | None = None) -> list[Path]:
    """Store folders under ``models`` (default: the jmoss home's) converted from the local folder
    ``source``, finished or not, by what their manifest or resume journal records."""
    models = models or jmoss_home() / "models"
    wanted = str(Path(source).expanduser().resolve())
    found = []
    for folder in sorted(models.iterdir()) if models.is_dir() else []:
        manifest = None
        try:
            if (folder / MANIFEST).is_file():
                manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            pass
        recorded = _recorded_source(folder, manifest if isinstance(manifest, dict) else None)
        if recorded is not None and recorded.get("id") == wanted:
            found.append(folder)
    return found


def default_store_dir_for_local(path: str | Path, variant: str | None = None) -> Path:
    """Store dir for a local checkpoint directory: ``<jmoss home>/models/<folder name>`` (plus the
    variant suffix), so ``jmoss chat <folder name>`` finds it from anywhere. The store this folder
    was already converted to keeps its place (older jmoss named it ``local--<name>-<hash>``);
    a name another source holds gets ``-2``, ``-3``…"""
    path = Path(path).expanduser().resolve()
    models = jmoss_home() / "models"
    for existing in stores_of_source(path, models):
        if _variant_of_dir(existing) == variant:
            return existing
    name = re.sub(r"[^A-Za-z0-9._-]", "_", path.name).strip("._-").replace("--", "-") or "model"
    for n in range(1, 1000):
        candidate = models / (f"{name}{'' if n == 1 else f'-{n}'}" + _suffix(variant))
        if not candidate.exists():
            return candidate
    tag = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    return models / f"{name}-{tag}{_suffix(variant)}"


def _variant_of_dir(folder: Path) -> str | None:
    """The variant suffix of a store folder's name (``x--int4`` -> ``int4``), or None."""
    _, sep, tail = folder.name.rpartition("--")
    return tail if sep and tail in VARIANTS else None


def store_variant(path: Path) -> str:
    """fp16, int8 or int4: how a finished store keeps its layers (its manifest's ``packed``)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        bits = manifest.get("packed", {}).get("bits") if isinstance(manifest.get("packed"), dict) else None
    except (OSError, ValueError, RecursionError, AttributeError):
        bits = None
    return {8: "int8", 4: "int4"}.get(bits, "fp16")


def _looks_like_store(path: Path) -> bool:
    """A folder jmoss wrote into (finished or not): a store's own files, not a checkpoint's."""
    return any((path / name).exists() for name in (MANIFEST, JOURNAL, "embed.safetensors", "head.safetensors", layout.layer_file(0)))


def is_checkpoint_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and not _looks_like_store(path) and any(
        path.glob(pattern) for pattern in ("*.safetensors", "pytorch_model*.bin", "*.index.json")
    )


def _same_path(a: str | Path, b: str | Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _recorded_source(path: Path, manifest: Mapping[str, Any] | None = None) -> Mapping[str, Any] | None:
    """The source a store was converted from: its manifest's record, else its resume journal's."""
    if manifest is not None and isinstance(manifest.get("source"), dict) and manifest["source"].get("id"):
        return manifest["source"]
    try:
        journal = json.loads((path / JOURNAL).read_text(encoding="utf-8"))
        source = journal["identity"]["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return source if isinstance(source, dict) and source.get("id") else None


def repair_command(path: str | Path, manifest: Mapping[str, Any] | None = None) -> str:
    """The `jmoss convert` command that finishes or repairs the store at ``path``.

    ``--out`` is added only when ``path`` is not where that source converts by default, so the
    command never writes into the source folder or anywhere else than this store. Without a
    recorded source, a store at the default place of a Hub repo still names the repo; otherwise
    the command says SOURCE.
    """
    path = Path(path).expanduser()
    source = _recorded_source(path, manifest)
    if source is None:
        models = jmoss_home() / "models"
        variant = _variant_of_dir(path)
        base = path.name[: -len(_suffix(variant))] if variant else path.name
        if _same_path(path.parent, models) and base.count("--") == 1 and not base.startswith("local--"):
            repo = base.replace("--", "/", 1)
            return f"jmoss convert {repo}" + _variant_flags(variant)
        return f"jmoss convert SOURCE --out {shlex.quote(str(path))}"
    source_id = str(source["id"])
    hub = not Path(source_id).is_absolute()
    quantization = source.get("quantization") if isinstance(source.get("quantization"), dict) else {}
    flags = ""
    if quantization.get("method") == "rtn" and quantization.get("bits") in ([8], [4]):
        flags = f" --quantize int{quantization['bits'][0]}"
    elif quantization.get("dequantized_to"):
        flags = " --dequantize"
    variant = _variant_of_dir(path)
    try:
        default = default_store_dir(source_id, variant) if hub else default_store_dir_for_local(source_id, variant)
    except ModelNotFoundError:
        default = None
    command = f"jmoss convert {shlex.quote(source_id)}{flags}{_width_flags(manifest)}"
    revision = source.get("revision")
    if hub and isinstance(revision, str) and re.fullmatch(r"[0-9a-f]{40}", revision):
        command += f" --revision {revision}"  # the exact commit: the branch may have moved since
    if default is None or not _same_path(default, path):
        command += f" --out {shlex.quote(str(path))}"
    return command


def _width_flags(manifest: Mapping[str, Any] | None) -> str:
    """--head-bits/--embed-bits that rewrite a packed store's lm_head/wte as its manifest records them
    (none for the default 8 bits, nor for a store from before packed heads, whose default was fp16)."""
    packed = manifest.get("packed") if isinstance(manifest, Mapping) else None
    if not isinstance(packed, dict) or "lm_head" not in packed:
        return ""
    flags = ""
    for flag, key in (("--head-bits", "lm_head"), ("--embed-bits", "wte")):
        entry = packed.get(key)
        bits = 16 if entry == "float16" else entry.get("bits") if isinstance(entry, dict) else None
        if bits in (4, 16):
            flags += f" {flag} {bits}"
    return flags


def _variant_flags(variant: str | None) -> str:
    return {"int8": " --quantize int8", "int4": " --quantize int4", "fp16": " --dequantize"}.get(variant or "", "")


def repair_hint(path: str | Path, manifest: Mapping[str, Any] | None = None, purpose: str = "to repair it") -> str:
    """"run `jmoss convert ...` to repair it", explaining SOURCE when the store does not record it."""
    command = repair_command(path, manifest)
    hint = f"run `{command}` {purpose}"
    if command.startswith("jmoss convert SOURCE "):
        hint += " (SOURCE: the Hugging Face repo id or checkpoint folder it was converted from)"
    return hint


def not_finished(path: Path) -> ModelNotFoundError:
    if (path / JOURNAL).exists():
        why = "a conversion into it was interrupted"
    else:
        why = "it has no jmoss.json manifest"
    return ModelNotFoundError(
        f"{path} exists but is not a finished jmoss store ({why}); {repair_hint(path, purpose='to finish it')}"
    )


def resolve_model(name_or_path: str) -> Path:
    """The store directory for a store path, a converted local checkpoint, or a converted repo id."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(
                f"{path} is a file; a jmoss store is the folder `jmoss convert SOURCE` writes (SOURCE: a "
                "Hugging Face repo id or a checkpoint folder)"
            )
        if (path / MANIFEST).is_file():
            return path
        if is_checkpoint_dir(path):
            converted = default_store_dir_for_local(path)
            if (converted / MANIFEST).is_file():
                return converted
            if converted.exists():
                raise not_finished(converted)
            raise ModelNotFoundError(
                f"{path} is a Hugging Face checkpoint, not a jmoss store; convert it first: "
                f"`jmoss convert {name_or_path}` (writes {converted})"
            )
        if _looks_like_store(path):
            raise not_finished(path)
        raise ModelNotFoundError(
            f"{path} is neither a jmoss store nor a Hugging Face checkpoint folder (no jmoss.json, no "
            "config.json with weights); give a store, or convert a checkpoint with `jmoss convert SOURCE`"
        )
    name, variant = split_variant(name_or_path)
    plain = default_store_dir(name)
    candidates = [plain] if variant is None else [default_store_dir(name, variant), plain]
    for store in candidates:
        if (store / MANIFEST).is_file() and (variant is None or store_variant(store) == variant):
            return store
    if variant is None:  # no plain store: the one variant converted, when there is exactly one
        others = [default_store_dir(name, v) for v in VARIANTS]
        finished = [s for s in others if (s / MANIFEST).is_file()]
        if len(finished) == 1:
            return finished[0]
        if len(finished) > 1:
            raise ModelNotFoundError(
                f"{name} is converted as {', '.join(f'{name}:{_variant_of_dir(s)}' for s in finished)}; name one of them")
    for store in candidates:
        if store.exists() and not (store / MANIFEST).is_file():
            raise not_finished(store)
    raise NotConvertedError(
        f"model {name_or_path!r} has not been converted yet; run `jmoss pull {name_or_path}` (downloads it from "
        f"Hugging Face and converts it into {candidates[0]}; `jmoss convert {name}` does the same with more "
        "options), or pass --pull", name, variant)
