"""Where stores live, how a name or path resolves to one, and the command that repairs one.

``resolve_model`` maps what a user types (a store folder, a converted checkpoint folder, a Hugging
Face repo id) to a store directory; ``repair_hint`` is the sentence every store error ends with.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from pathlib import Path
from typing import Any, Mapping

from jmoss import layout
from jmoss.errors import ModelNotFoundError
from jmoss.home import jmoss_home
from jmoss.store_format import JOURNAL, MANIFEST


# ----------------------------------------------------------------------------------- names


def default_store_dir(repo_id: str) -> Path:
    """``<jmoss home>/models/<org>--<name>`` for a Hugging Face repo id."""
    parts = repo_id.strip("/").split("/")
    if not 1 <= len(parts) <= 2 or not all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", p) for p in parts):
        raise ModelNotFoundError(f"{repo_id!r} is not a Hugging Face repo id (expected 'org/name') nor an existing path")
    return jmoss_home() / "models" / "--".join(parts)


def default_store_dir_for_local(path: str | Path) -> Path:
    """Store dir for a local checkpoint directory: named after it, plus a hash of its full path."""
    path = Path(path).expanduser().resolve()
    tag = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", path.name) or "model"
    return jmoss_home() / "models" / f"local--{name}-{tag}"


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
        if _same_path(path.parent, models) and "--" in path.name and not path.name.startswith("local--"):
            repo = path.name.replace("--", "/", 1)
            return f"jmoss convert {repo}"
        return f"jmoss convert SOURCE --out {shlex.quote(str(path))}"
    source_id = str(source["id"])
    hub = not Path(source_id).is_absolute()
    try:
        default = default_store_dir(source_id) if hub else default_store_dir_for_local(source_id)
    except ModelNotFoundError:
        default = None
    command = f"jmoss convert {shlex.quote(source_id)}"
    revision = source.get("revision")
    if hub and isinstance(revision, str) and re.fullmatch(r"[0-9a-f]{40}", revision):
        command += f" --revision {revision}"  # the exact commit: the branch may have moved since
    if default is None or not _same_path(default, path):
        command += f" --out {shlex.quote(str(path))}"
    return command


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
    store = default_store_dir(name_or_path)
    if (store / MANIFEST).is_file():
        return store
    if store.exists():
        raise not_finished(store)
    raise ModelNotFoundError(
        f"model {name_or_path!r} has not been converted yet; run `jmoss convert {name_or_path}` "
        f"(downloads it from Hugging Face and writes {store})"
    )

