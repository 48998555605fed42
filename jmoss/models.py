"""Converted models on this machine: ``jmoss pull``, ``jmoss list``, ``jmoss rm`` (ollama's verbs).

A model is a store folder under ``$JMOSS_HOME/models`` (jmoss.store names them): ``org--name`` for a
Hugging Face repo in its own format, ``org--name--int4`` (``--int8``, ``--fp16``) for another
variant of it beside that one, ``<folder name>`` for a local checkpoint. ``pull`` downloads (bytes
shown by huggingface_hub's progress bars) and converts (bytes shown by the converter's) in one step;
interrupted, it resumes like ``jmoss convert``. ``hub_config`` fetches a repo's config.json alone,
which is all ``jmoss info`` needs to plan a model before it is pulled.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from jmoss.errors import ModelNotFoundError, StoreError
from jmoss.home import jmoss_home
from jmoss.store import JOURNAL, MANIFEST, check_files, read_manifest
from jmoss.store_paths import (
    VARIANTS, _looks_like_store, _recorded_source, _variant_of_dir, default_store_dir, resolve_model, split_variant,
    store_variant,
)


def models_dir() -> Path:
    return jmoss_home() / "models"


def pull(name: str, *, revision: str | None = None, progress: bool = True) -> Path:
    """Download ``name`` (``org/name`` or ``org/name:fp16|int8|int4``) from Hugging Face and convert
    it; return the store. An already converted, intact store is kept as it is."""
    from jmoss.converters.convert import convert

    repo, variant = split_variant(name)
    default_store_dir(repo)  # a malformed name fails here, before any download
    return convert(repo, None, revision=revision, progress=progress, variant=variant)


def hub_config(name: str, revision: str | None = None) -> Path:
    """config.json of a Hugging Face repo (``org/name[:variant]``), downloaded alone into the HF cache."""
    import os

    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    from jmoss.converters.sources import hub_unreachable

    repo, _ = split_variant(name)
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    down = None if offline else hub_unreachable()
    try:
        return Path(hf_hub_download(repo, "config.json", revision=revision, local_files_only=down is not None))
    except GatedRepoError:
        raise ModelNotFoundError(f"{repo} is gated on Hugging Face: accept its terms and log in with `hf auth login`") from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"{repo} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"no Hugging Face repo {repo!r} (or it is private: log in with `hf auth login`)") from None
    except EntryNotFoundError:
        raise ModelNotFoundError(f"{repo} has no config.json on the Hugging Face Hub") from None
    except LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE is set" if offline else
               f"the Hugging Face Hub ({constants.ENDPOINT}) could not be reached: {down}")
        raise ModelNotFoundError(f"{why}, and config.json of {repo} is not in the Hugging Face cache "
                                 f"({constants.HF_HUB_CACHE})") from None
    except OSError as exc:
        raise ModelNotFoundError(f"could not download config.json of {repo} from {constants.ENDPOINT}: {exc}") from None


@dataclass
class Entry:
    """One line of ``jmoss list``."""

    name: str  # what chat/serve/generate take: org/name[:variant], or a local store's folder name
    variant: str  # fp16, int8, int4
    size: int  # bytes on disk
    path: Path
    status: str  # "ok" (every file present at its recorded size; "sha256 ok" with verify), or what is wrong


def _name_of(folder: Path, source: dict | None) -> str:
    """The name that resolves to ``folder``: the repo id (plus its variant suffix) or the folder name."""
    variant = _variant_of_dir(folder)
    base = folder.name[: -len(f"--{variant}")] if variant else folder.name
    hub = source is not None and not Path(str(source.get("id", ""))).is_absolute()
    if hub and base.count("--") == 1:
        base = base.replace("--", "/", 1)
    return base + (f":{variant}" if variant else "")


def list_models(*, verify: bool = False) -> list[Entry]:
    """Every store (finished or not) under the models folder, sorted by name."""
    entries = []
    root = models_dir()
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if not folder.is_dir() or not _looks_like_store(folder):
            continue
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        manifest = None
        if (folder / MANIFEST).is_file():
            try:
                manifest = read_manifest(folder)
                problems = check_files(folder, manifest, hashes=verify)
                status = ("sha256 ok" if verify else "ok") if not problems else "damaged: " + "; ".join(
                    f"{n}: {p}" for n, p in list(problems.items())[:3])
            except StoreError as exc:
                status = f"damaged: {str(exc).splitlines()[0][:120]}"
        else:
            status = "interrupted: `jmoss pull` or `jmoss convert` again resumes" if (folder / JOURNAL).exists() \
                else "incomplete (no manifest)"
        source = _recorded_source(folder, manifest)
        entries.append(Entry(_name_of(folder, dict(source) if source else None),
                             store_variant(folder) if manifest else (_variant_of_dir(folder) or "?"), size, folder,
                             status))
    return entries


def remove(name: str) -> Path:
    """Delete the store ``name`` resolves to (a name, ``name:variant`` or a store folder); return it.

    Only a folder that is a jmoss store (finished or interrupted) is deleted, never a checkpoint
    or anything else; the download stays in the Hugging Face cache (``hf cache`` manages it)."""
    path = Path(name).expanduser()
    if path.is_dir() and _looks_like_store(path):
        store = path
    else:
        try:
            store = resolve_model(name)
        except ModelNotFoundError:
            store = None
        if store is None or store == path:
            repo, variant = split_variant(name)
            candidates = [models_dir() / name]
            try:
                candidates.append(default_store_dir(repo, variant))
            except ModelNotFoundError:
                pass
            store = next((c for c in candidates if c.is_dir() and _looks_like_store(c)), None)
            if store is None:
                known = ", ".join(e.name for e in list_models()) or "none"
                raise ModelNotFoundError(f"no converted model {name!r} here (converted: {known}; see `jmoss list`)")
    if not _looks_like_store(store):
        raise StoreError(f"{store} is not a jmoss store; refusing to delete it")
    shutil.rmtree(store)
    return store


def describe(entries: list[Entry]) -> str:
    """``jmoss list``'s table."""
    from jmoss.sizes import format_size

    if not entries:
        return f"no models in {models_dir()}; `jmoss pull org/name` downloads and converts one, `jmoss demo` makes one"
    rows = [("NAME", "VARIANT", "SIZE", "VERIFIED", "PATH")]
    rows += [(e.name, e.variant, format_size(e.size), e.status, str(e.path)) for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows)


__all__ = ["Entry", "VARIANTS", "describe", "hub_config", "list_models", "models_dir", "pull", "remove"]
