"""Where a checkpoint comes from, and its tensors enumerated lazily across files and formats.

``resolve(source)`` accepts a local directory or a Hugging Face repo id. For a repo id only the
files conversion needs are fetched with huggingface_hub (which honours HF_HOME,
HF_HUB_OFFLINE and ``revision``): config.json, the tokenizer files, one weight index if there
is one, and exactly the weight files it names (safetensors preferred over pickles when a repo
has both). ``Source.iter_tensors`` then yields ``SourceTensor`` descriptions file by file; no
tensor's bytes are read until its ``open()`` context is entered.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

import numpy as np

from jmoss.converters.torch_zip import TorchZipCheckpoint, map_region, numpy_dtype
from jmoss.errors import CheckpointError, ConfigError, ModelNotFoundError
from jmoss.config import parse_json_bytes
from jmoss.store_format import TOKENIZER_FILES, inside, parse_safetensors_header, read_small_file, safe_name

MAX_SHARDS = 10000  # moss-moon-003 has 4 shards; an index naming more is not a real checkpoint

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PYTORCH_INDEX = "pytorch_model.bin.index.json"
PYTORCH_SINGLE = "pytorch_model.bin"
GPTQ_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")

_SAFETENSORS_DTYPES = {
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "BF16": "bfloat16",
    "I8": "int8",
    "U8": "uint8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
    "BOOL": "bool",
}


@dataclass
class SourceTensor:
    """One tensor of the source: what it is, and how to map its bytes when needed."""

    name: str
    dtype: str  # numpy dtype name, or "bfloat16" (delivered as raw uint16)
    shape: tuple[int, ...]
    file: Path
    opener: Callable[[], ContextManager[np.ndarray]] = field(repr=False)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * numpy_dtype(self.dtype).itemsize

    def open(self) -> ContextManager[np.ndarray]:
        """A read-only view of the tensor, valid inside the ``with`` block (mmap-backed)."""
        return self.opener()


@dataclass
class Source:
    """A resolved checkpoint: local paths of everything conversion reads, plus provenance."""

    id: str
    revision: str | None
    root: Path
    config_path: Path
    weight_format: str  # "safetensors" or "pytorch"
    weight_files: list[Path]
    index: dict[str, str] | None  # tensor name -> file name, when the checkpoint has an index
    tokenizer_files: list[Path]
    hub: bool = False

    def describe(self) -> dict[str, Any]:
        """Provenance recorded in the store manifest (and used to match a resumed conversion)."""
        return {
            "id": self.id,
            "revision": self.revision,
            "format": self.weight_format,
            "files": [{"name": p.name, "size": p.stat().st_size} for p in self.weight_files],
        }

    def redownload_hint(self, file: Path | str) -> str:
        name = Path(file).name
        if self.hub:
            return f"re-download it: `hf download {self.id} {name} --force-download`"
        return f"re-download or re-copy {name} into {self.root}"

    def is_gptq(self) -> bool:
        names = self.index.keys() if self.index else (t.name for t in self.iter_tensors())
        return any(n.endswith(".qweight") for n in names)

    def iter_tensors(self, wanted: Callable[[str], bool] | None = None) -> Iterator[SourceTensor]:
        """Every tensor, file by file (skipping files the index says hold nothing ``wanted``)."""
        for path in self.weight_files:
            if wanted is not None and self.index is not None:
                if not any(wanted(n) for n, f in self.index.items() if f == path.name):
                    continue
            tensors = (_safetensors_tensors if self.weight_format == "safetensors" else _torch_tensors)(path, self.redownload_hint(path))
            for tensor in tensors:
                if self.index is not None and self.index.get(tensor.name) != path.name:
                    # the index says where each tensor is: a copy elsewhere would win or lose by file order
                    raise CheckpointError(
                        f"{path.name} holds tensor {tensor.name[:100]}, but the weight index "
                        f"{'puts it in ' + str(self.index[tensor.name]) if tensor.name in self.index else 'does not list it'}; "
                        "the checkpoint is inconsistent: re-download the index and its shards"
                    )
                yield tensor


def _torch_tensors(path: Path, hint: str) -> Iterator[SourceTensor]:
    ckpt = TorchZipCheckpoint(path, hint=hint)
    for name, ref in ckpt.tensors.items():
        yield SourceTensor(name, ref.dtype, ref.shape, path, lambda n=name: ckpt.open_tensor(n))


def _safetensors_tensors(path: Path, hint: str) -> Iterator[SourceTensor]:
    # Every declared size is checked against the file before anything is mapped (store.py).
    start, entries, _ = parse_safetensors_header(path, CheckpointError, hint)
    for name, (st_dtype, shape, begin, _end) in entries.items():
        dtype = _SAFETENSORS_DTYPES.get(st_dtype)
        if dtype is None:
            raise CheckpointError(f"{path.name}: tensor {name[:100]} has dtype {st_dtype}, which jmoss cannot convert")
        yield SourceTensor(name, dtype, shape, path, lambda b=start + begin, s=shape, d=dtype: _mapped(path, b, s, d))


@contextlib.contextmanager
def _mapped(path: Path, offset: int, shape: tuple[int, ...], dtype: str) -> Iterator[np.ndarray]:
    np_dtype = numpy_dtype(dtype)
    with map_region(path, offset, int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize) as buf:
        array = np.frombuffer(buf, dtype=np_dtype).reshape(shape)
        try:
            yield array
        finally:
            del array


# ----------------------------------------------------------------------------------- resolving


def _read_index(path: Path, hint: Callable[[str], str]) -> dict[str, str]:
    data = parse_json_bytes(read_small_file(path, CheckpointError), path, CheckpointError)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{path.name} is not a valid weight index (no weight_map object); {hint(path.name)}")
    if not all(isinstance(k, str) and safe_name(v) for k, v in weight_map.items()):
        bad = next(v for k, v in weight_map.items() if not (isinstance(k, str) and safe_name(v)))
        raise CheckpointError(
            f"{path.name}: weight_map must map tensor names to file names in the same folder; it names {str(bad)[:100]!r}"
        )
    if len(set(weight_map.values())) > MAX_SHARDS:
        raise CheckpointError(f"{path.name} names {len(set(weight_map.values()))} shards (limit {MAX_SHARDS}); not a real checkpoint")
    return weight_map


def check_within(root: Path, file: Path) -> Path:
    """``file`` if it resolves inside ``root``, or inside the Hugging Face cache's blobs/ of the
    repo whose snapshot ``root`` is (the hub links snapshot files there by design); else an error."""
    if inside(root, file):
        return file
    root = Path(root)
    if root.parent.name == "snapshots" and inside(root.parent.parent / "blobs", file):
        return file
    raise CheckpointError(
        f"{file} is a link to {os.path.realpath(file)}, outside the checkpoint folder {root}; refused "
        "(copy the real file into the folder if it belongs to the model)"
    )


def _ordered_files(weight_map: dict[str, str]) -> list[str]:
    return sorted(set(weight_map.values()))


def _local_source(root: Path) -> Source:
    if not (root / "config.json").is_file():
        raise ConfigError(f"{root} has no config.json; point `jmoss convert` at a Hugging Face model folder")
    hint = lambda name: f"re-download or re-copy {name} into {root}"  # noqa: E731
    index, fmt, files = None, None, []
    if (root / SAFETENSORS_INDEX).is_file():
        index, fmt = _read_index(root / SAFETENSORS_INDEX, hint), "safetensors"
    elif sorted(root.glob("*.safetensors")):
        fmt, files = "safetensors", sorted(root.glob("*.safetensors"))
    elif (root / PYTORCH_INDEX).is_file():
        index, fmt = _read_index(root / PYTORCH_INDEX, hint), "pytorch"
    elif sorted(root.glob("pytorch_model*.bin")):
        fmt, files = "pytorch", sorted(root.glob("pytorch_model*.bin"))
    else:
        raise CheckpointError(
            f"{root} has no weights: expected {SAFETENSORS_INDEX}, *.safetensors, {PYTORCH_INDEX} or pytorch_model*.bin"
        )
    if index is not None:
        files = [root / name for name in _ordered_files(index)]
        missing = [p.name for p in files if not p.is_file()]
        if not missing:
            files = [check_within(root, p) for p in files]
        if missing:
            raise CheckpointError(
                f"{root}: the weight index lists shard(s) that are missing: {', '.join(missing)}; download them into {root}"
            )
    if len(files) > MAX_SHARDS:
        raise CheckpointError(f"{root} has {len(files)} weight files (limit {MAX_SHARDS}); not a real checkpoint")
    check_within(root, root / "config.json")
    for index_name in (SAFETENSORS_INDEX, PYTORCH_INDEX):
        if (root / index_name).exists():
            check_within(root, root / index_name)
    files = [check_within(root, p) for p in files]
    tokenizer = [check_within(root, root / n) for n in TOKENIZER_FILES if os.path.lexists(root / n)]
    not_files = [p.name for p in tokenizer if not p.is_file()]
    if not_files:
        raise CheckpointError(f"{root}: {', '.join(not_files)} is not a regular file (a dangling link or a folder); fix or remove it")
    return Source(
        id=str(root),
        revision=None,
        root=root,
        config_path=root / "config.json",
        weight_format=fmt,
        weight_files=files,
        index=index,
        tokenizer_files=tokenizer,
    )


def _root_cause(exc: BaseException) -> str:
    """The innermost reason in an exception chain, e.g. '[Errno 111] Connection refused'."""
    seen = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    for cause in reversed(seen):
        text = str(cause).strip()
        if text:
            return text.splitlines()[0]
    return type(seen[-1]).__name__


def _hub_source(repo_id: str, revision: str | None) -> Source:
    import huggingface_hub
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    label = f"{repo_id}" + (f" (revision {revision})" if revision else "")

    def not_cached(filename: str) -> ModelNotFoundError:
        return ModelNotFoundError(
            f"HF_HUB_OFFLINE is set and {filename} of {label} is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); unset HF_HUB_OFFLINE to download it, pass a local folder, "
            "or set HF_HOME to a cache that has it"
        )

    def unreachable(filename: str, exc: BaseException) -> ModelNotFoundError:
        return ModelNotFoundError(
            f"could not reach the Hugging Face Hub ({constants.ENDPOINT}) to download {filename} of {label}: "
            f"{_root_cause(exc)}; check the network, or pass a local folder, or set HF_HOME to a cache that "
            "has it (with HF_HUB_OFFLINE=1)"
        )

    def known_absent(filename: str) -> bool:
        """The cache remembers the Hub saying this file does not exist (so no network is needed)."""
        try:
            cached = huggingface_hub.try_to_load_from_cache(repo_id, filename, revision=revision)
        except (ValueError, OSError):
            return False
        return cached is huggingface_hub._CACHED_NO_EXIST

    down = None if offline else hub_unreachable()  # None: reachable (or offline: the cache is all there is)

    def fetch(filename: str, required: bool = False) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=down is not None))
        except GatedRepoError:
            raise ModelNotFoundError(f"{repo_id} is gated on Hugging Face: accept its terms and log in with `hf auth login`") from None
        except RevisionNotFoundError:
            raise ModelNotFoundError(f"{repo_id} has no revision {revision!r}") from None
        except RepositoryNotFoundError:
            raise ModelNotFoundError(
                f"no Hugging Face repo {repo_id!r} (or it is private: log in with `hf auth login`); "
                "to convert a local folder give its path"
            ) from None
        except LocalEntryNotFoundError as exc:  # the Hub was not asked, or did not answer, and the cache lacks it
            if down is not None:  # the cache is all there is, as offline
                if required:
                    raise unreachable(filename, OSError(down)) from None
                return None
            offline_cause = offline or isinstance(exc.__cause__, OfflineModeIsEnabled)
            if offline_cause:
                if required:
                    raise not_cached(filename) from None
                return None  # offline, the cache is all there is: a file it lacks is absent
            if not required and known_absent(filename):
                return None
            raise unreachable(filename, exc) from None
        except EntryNotFoundError:  # the Hub answered: no such file
            if not required:
                return None
            raise ModelNotFoundError(f"{repo_id} has no {filename} on the Hugging Face Hub; check the repo id and --revision") from None
        except OSError as exc:  # e.g. the Hub answered with a server error, or the connection dropped mid-file
            raise unreachable(filename, exc) from None
        except Exception as exc:
            if type(exc).__module__.split(".")[0].startswith(("httpx", "httpcore")):  # a network error not wrapped
                raise unreachable(filename, exc) from None
            raise

    config = fetch("config.json", required=True)
    assert config is not None
    index, fmt, files = None, None, []
    for index_name, single, kind in ((SAFETENSORS_INDEX, SAFETENSORS_SINGLE, "safetensors"), (PYTORCH_INDEX, PYTORCH_SINGLE, "pytorch")):
        index_path = fetch(index_name)
        if index_path is not None:
            hint = lambda name: f"re-download it: `hf download {repo_id} {name} --force-download`"  # noqa: E731
            index, fmt = _read_index(index_path, hint), kind
            files = []
            for name in _ordered_files(index):
                path = fetch(name)
                if path is None:
                    raise CheckpointError(f"{repo_id}: shard {name} listed in {index_name} is missing from the repo or the cache")
                files.append(path)
            break
        single_path = fetch(single)
        if single_path is not None:
            fmt, files = kind, [single_path]
            break
    if fmt is None and down is not None:
        raise unreachable("the weights", OSError(down))
    if fmt is None:
        where = " in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else ""
        raise CheckpointError(f"{repo_id} has no weights{where}: looked for {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, {PYTORCH_INDEX}, {PYTORCH_SINGLE}")
    tokenizer = [p for p in (fetch(n) for n in TOKENIZER_FILES) if p is not None]
    snapshot = config.parent
    for path in (config, *files, *tokenizer):
        check_within(snapshot, path)
    resolved = snapshot.name if snapshot.parent.name == "snapshots" else revision
    return Source(
        id=repo_id,
        revision=resolved,
        root=snapshot,
        config_path=config,
        weight_format=fmt,
        weight_files=files,
        index=index,
        tokenizer_files=tokenizer,
        hub=True,
    )


def resolve(source: str, revision: str | None = None) -> Source:
    """A local checkpoint directory, or a Hugging Face repo id fetched into the HF cache."""
    for prefix in ("hf.co/", "huggingface.co/", "https://huggingface.co/"):
        if source.startswith(prefix) and source.count("/") == prefix.count("/") + 1:
            return _hub_source(source[len(prefix):], revision)  # explicitly the Hub
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; give the folder that holds config.json and the weights")
        if revision is not None:
            raise CheckpointError("--revision applies to Hugging Face repo ids, not to a local folder")
        return _local_source(path.resolve())
    parts = source.split("/")
    if len(parts) != 2 or not all(parts) or source.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"{source!r} is neither an existing folder nor a Hugging Face repo id ('org/name')")
    typo = local_typo(source)
    if typo is not None:
        raise ModelNotFoundError(typo)
    return _hub_source(source, revision)


def local_typo(source: str) -> str | None:
    """Why ``org/name`` is most likely a mistyped local folder (its "org" is a folder here that does
    not hold "name"), naming the nearest folder in it; None when it reads as a Hub id."""
    import difflib

    parent, name = Path(source).parent, Path(source).name
    if not parent.is_dir():
        return None
    folders = sorted(p.name for p in parent.iterdir() if p.is_dir())
    near = difflib.get_close_matches(name, folders, n=1, cutoff=0.6)
    hint = f"did you mean {parent / near[0]}?" if near else f"it holds {', '.join(folders[:8]) or 'no folders'}"
    return (f"there is no folder {source} ({hint}); {parent}/ is a folder here, so {source!r} was not tried as a "
            f"Hugging Face repo id: for the Hub, run it from another folder or write it as hf.co/{source}")


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hub's endpoint cannot be reached (one quick TCP connect), or None when it answers.

    huggingface_hub retries a refused or unresolvable connection five times over ~25 s, printing a
    line each time; one probe lets jmoss say so at once and fall back to the cache."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return None
    except OSError as exc:
        return str(exc) or type(exc).__name__
