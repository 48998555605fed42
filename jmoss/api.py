"""The public entry points: ``jmoss.load`` and ``Model``.

    model = jmoss.load("fnlp/moss-moon-003-sft", device_memory="12GiB")
    logits = model.logits([[1, 2, 3]])           # [batch, seq, vocab] float32, one full forward
    session = model.session()                    # incremental prefill/decode with a static KV cache

A Model ties together a config, where each layer's weights live (the weight source chosen from
the placement plan), the jittor math of jmoss.model, and the tokenizer. Generation and chat are
methods here but live in jmoss.generation / jmoss.chat.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np

from jmoss import layout
from jmoss.config import MossConfig
from jmoss.engine.factory import build_hybrid, build_weights, measure_figures
from jmoss.engine.ops import check_threads, default_weight_dtype, pick_ops
from jmoss.engine.resident import ResidentWeights, read_huge_pages, weight_pages
from jmoss.engine.swap import JittorSwapWeights
from jmoss.errors import BudgetError, DeviceError, GenerationError, ModelNotFoundError
from jmoss.jittor_setup import get_jittor, resolve_device
from jmoss.model import MossModel, rotary_tables
from jmoss.embedding import EmbeddingTable
from jmoss.session import Session
from jmoss.stats import Stats
from jmoss.warmup import warm_up

if TYPE_CHECKING:
    from jmoss.tokenizer import Tokenizer

DTYPES = ("float32", "float16")


def _check_dtype(name: str, value: str) -> None:
    if value not in DTYPES:
        raise DeviceError(f"{name} must be one of {', '.join(DTYPES)}, got {value!r}")


class Model:
    """A loaded MOSS/CodeGen model; see the module docstring for the surface."""

    def __init__(
        self,
        config: MossConfig,
        groups: Mapping[Any, Mapping[str, np.ndarray]],
        *,
        device: str = "cpu",
        dtype: str | None = None,
        compute_dtype: str | None = None,
        tokenizer_path: str | Path | None = None,
        weights=None,
        path: Path | None = None,
        plan=None,
        threads: int | None = None,
        net=None,
    ):
        self.device = resolve_device(device)
        self.jt = get_jittor(self.device)
        self.config = config
        self.path = path
        self.dtype = dtype or ("float16" if self.device == "cuda" else "float32")
        self.compute_dtype = compute_dtype or ("float16" if self.device == "cuda" else "float32")
        _check_dtype("dtype", self.dtype)
        _check_dtype("compute_dtype", self.compute_dtype)
        self.plan = plan  # the jmoss.placement.Plan the weights follow (None: built without one)
        self.rotary = rotary_tables(config)
        self._wte = EmbeddingTable(groups[layout.EMBED], config)  # host-side (often a read-only memmap)
        self.weights = weights or ResidentWeights(self.jt, groups, config.n_layer, self.dtype)
        self.threads = check_threads(threads)  # None: the kernels' default (JMOSS_THREADS, else the affinity)
        self.ops = pick_ops(self.jt, self.device, self.dtype, self.compute_dtype, threads=self.threads)
        # the model's math; an offload-cpu plan runs it as segments on two backends (jmoss.engine.segments)
        self.net = net or MossModel(self.jt, config, self.ops, self.compute_dtype)
        self._tokenizer_path = Path(tokenizer_path) if tokenizer_path else None
        self._tokenizer: Tokenizer | None = None
        self.stats = Stats()  # every generation on this model records here (jmoss.stats; GET /metrics)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any], config: MossConfig, **kwargs) -> "Model":
        """Build from a Hugging Face-named state dict (numpy arrays or tensors with .numpy())."""
        arrays = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)) for k, v in state_dict.items()}
        return cls(config, layout.split_state_dict(arrays, config), **kwargs)

    # -- tokens ----------------------------------------------------------------------------
    @property
    def tokenizer(self) -> "Tokenizer":
        if self._tokenizer is None:
            if self._tokenizer_path is None:
                raise GenerationError("this model was built without tokenizer files; pass token ids")
            from jmoss.errors import TokenizerError
            from jmoss.tokenizer import load_tokenizer

            try:
                self._tokenizer = load_tokenizer(self._tokenizer_path)
            except TokenizerError as exc:
                if self.path is None or any((self.path / n).is_file() for n in ("tokenizer.json", "vocab.json")):
                    raise
                raise TokenizerError(
                    f"{self.path} has no tokenizer files: the checkpoint it was converted from had none. Copy "
                    "tokenizer.json (or vocab.json + merges.txt) into that checkpoint folder and run the same "
                    "`jmoss convert` again (only they are added), or pass token ids instead of text") from exc
        return self._tokenizer

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Gather embedding rows on the host: decode needs one row per token, not the table."""
        return self._wte.rows(ids).reshape(*ids.shape, -1)  # a packed table: only these rows dequantized

    # -- forward ---------------------------------------------------------------------------
    def session(self, batch: int = 1, max_len: int | None = None) -> Session:
        """A fresh incremental state (static KV cache) for ``batch`` sequences."""
        return Session(self, batch=batch, max_len=max_len)

    def logits(self, input_ids: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
        """One full forward without a persistent cache: float32 [batch, seq, vocab_size]."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise GenerationError("input_ids must be a non-empty [batch, seq] array of token ids")
        session = self.session(batch=ids.shape[0], max_len=ids.shape[1])  # raises past n_positions
        return session.prefill(ids, last_only=False)

    # -- generation (jmoss.generation) ---------------------------------------------------------
    def generate(self, prompt, **options) -> str | list[str]:
        """Generate text for a prompt (text or token ids); options as in Hugging Face's generate."""
        from jmoss.generation import generate

        return generate(self, prompt, **options)

    def stream(self, prompt, **options) -> Iterator[str]:
        """Like generate, but yield text deltas as they are produced (never a split UTF-8 character)."""
        from jmoss.generation import stream

        return stream(self, prompt, **options)

    def stream_batch(self, prompts: Sequence, *, max_batch: int | None = None, **options) -> Iterator[tuple[int, str]]:
        """``(index, delta)`` for many prompts generated together (continuous batching, jmoss.batching);
        each prompt's text is what ``stream`` gives it alone."""
        from jmoss.batching import stream_batch

        return stream_batch(self, prompts, max_batch=max_batch, **options)

    def json_constraint(self, schema: dict | None = None, *, leading_space: bool = False):
        """A ``constraint=`` for generate/stream/chat: output that is one JSON document valid under
        ``schema`` (None: any JSON object), enforced at every token (jmoss.constraints)."""
        from jmoss.constraints import json_schema

        return json_schema(self.tokenizer, schema, eos_token_id=self.config.eos_token_id, leading_space=leading_space)

    def chat(self, meta_instruction: str | None = None, **kwargs):
        """A multi-turn MOSS conversation whose KV cache is kept across turns."""
        from jmoss.chat import Chat

        return Chat(self, meta_instruction=meta_instruction, **kwargs)


def _available_memory(device: str) -> tuple[int | None, int]:
    """(free device bytes or None when unknown, free host bytes), measured now."""
    import psutil

    host = int(psutil.virtual_memory().available)
    return (host if device == "cpu" else None), host


_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?(:(fp16|int8|int4))?")


def check_model_path(model: str | Path) -> None:
    """Fail clearly when ``model`` is meant as a path (a Path, or text that cannot be a Hugging Face
    repo id such as "/models/x", "./x", "~/x", "a/b/c") and nothing is there: otherwise the name
    lookup would answer "not converted yet" for a typo in a path."""
    text = str(model)
    if not isinstance(model, Path) and _REPO_ID.fullmatch(text):
        return  # "fnlp/moss-moon-003-sft", or a folder of that name here: resolve_model decides
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"{text} does not exist; give the folder of a converted jmoss store (made by "
            f"`jmoss convert <hf-repo-or-checkpoint-dir> --out DIR`) or a converted model name such as "
            f"fnlp/moss-moon-003-sft"
        )


def load(
    model: str | Path,
    *,
    device: str = "auto",
    dtype: str | None = None,
    device_memory: int | str | None = None,
    host_memory: int | str | None = None,
    compute_dtype: str | None = None,
    max_seq_len: int | None = None,
    prefetch_depth: int = 2,
    swap: str | None = None,
    batch: int = 1,
    prefill_chunk: int | None = None,
    require_tokenizer: bool = False,
    threads: int | None = None,
    offload: str = "auto",
    figures=None,
) -> Model:
    """Load a converted model (a store directory or a name given to ``jmoss convert``).

    ``device_memory``/``host_memory`` are sizes ("12GiB", "800MB", bytes) or None. None for the
    device means everything resident, checked against the memory measured free now (BudgetError
    with the numbers if it cannot fit). With a budget, jmoss.placement decides what stays
    resident and jmoss.engine streams the rest every token; a budget below what one layer needs
    fails here, naming the minimum. ``max_seq_len`` (default n_positions) sizes the KV cache the
    budget pays for, for ``batch`` sequences at once (``jmoss serve --max-batch``), in the compute
    dtype; prompts are prefilled in chunks of ``prefill_chunk`` tokens (default
    jmoss.placement.DEFAULT_PREFILL_CHUNK), the size the plan's working buffers are billed for.
    ``threads``: how many threads the CPU kernels run this model's ops on (default: ``JMOSS_THREADS``
    if set, else the CPUs this process may run on, ``os.sched_getaffinity``). ``swap="jittor"`` runs
    every weight as a plain Var under Jittor's own swap
    with ``cpu_mem_limit`` = device_memory: the baseline, valid only in a process started with
    JMOSS_JITTOR_SAVE_MEM=1 (``jmoss bench --compare jittor`` spawns one).

    The first load of a model (per jittor cache) also compiles every kernel its forwards will use
    (``jmoss.warmup``), so no later prompt or decode step stops to compile.

    ``require_tokenizer=True`` (what `jmoss generate`, `chat` and `serve` ask for) loads the store's
    tokenizer first, so a store without tokenizer files fails in a second, before any weight is
    read; otherwise the tokenizer is loaded when text is first given (token ids need none).

    ``offload`` (cuda, when the budget holds less than the whole model): "stream" copies the layers
    the card cannot hold to it every token; "cpu" computes them on the CPU from host RAM (decode and
    short prompt chunks; long chunks still stream them); "auto" (default) plans both and keeps the
    faster at decode, from ``figures`` (a jmoss.placement.Figures) or, when None, from probes run
    once per process (pinned copy speed, the CPU kernels, the device's bandwidth). ``model.plan``
    says which it chose and why; on cpu it has no effect.
    """
    from jmoss.placement import DEFAULT_PREFILL_CHUNK, OFFLOAD_MODES, plan_placement
    from jmoss.sizes import parse_size
    from jmoss.store import Store, resolve_model

    if offload not in OFFLOAD_MODES:  # before anything is probed or read
        raise DeviceError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, got {offload!r}")
    check_model_path(model)
    threads = check_threads(threads)
    device_memory, host_memory = parse_size(device_memory), parse_size(host_memory)
    store = Store.open(resolve_model(str(model)))
    tokenizer = _store_tokenizer(store) if require_tokenizer else None
    device = resolve_device(device)
    if layout.packed_bits(store.config):
        # packed layers are used as stored (integers + fp16 scales), never widened: the fp16 path
        if dtype not in (None, "float16"):
            raise DeviceError(f"{store.path} holds packed int{store.config.wbits} layers, used as stored: "
                              "load it with dtype float16 (the default), or convert the checkpoint with --dequantize")
        dtype = "float16"
    dtype = dtype or default_weight_dtype(device)
    _check_dtype("dtype", dtype)  # before planning: the plan sizes weights by it
    compute_dtype = compute_dtype or ("float16" if device == "cuda" else "float32")
    _check_dtype("compute_dtype", compute_dtype)  # the KV cache's dtype: the plan bills it
    common = dict(device=device, dtype=dtype, compute_dtype=compute_dtype, tokenizer_path=store.path, path=store.path,
                  threads=threads)

    if swap is not None:
        if swap != "jittor" or device != "cpu" or device_memory is None:
            raise DeviceError("swap='jittor' is the CPU baseline and needs device_memory (its cpu_mem_limit)")
        jt = get_jittor(device)
        weights = JittorSwapWeights(store, jt, dtype, device_memory)
        return _with_tokenizer(Model(store.config, _embed(store), weights=weights, **common), tokenizer)

    available_device, available_host = _available_memory(device)

    def plan_for(mode: str, speeds):
        return plan_placement(
            store.config, device=device, device_memory=device_memory, host_memory=host_memory,
            available_device_bytes=available_device, available_host_bytes=available_host,
            max_seq_len=max_seq_len, prefetch_depth=prefetch_depth, weight_itemsize=2 if dtype == "float16" else 4,
            batch=batch, kv_dtype=compute_dtype,
            prefill_chunk=DEFAULT_PREFILL_CHUNK if prefill_chunk is None else prefill_chunk,
            offload=mode, figures=speeds,
        )

    def offloads() -> bool:
        try:
            return plan_for("stream", None).streams
        except BudgetError:  # below streaming's minimum: offload cpu may still fit
            return True

    if device == "cuda" and offload != "stream" and figures is None and offloads():
        figures = measure_figures(get_jittor(device), store.config)  # what the choice needs, measured once
    plan = plan_for(offload, figures)
    net = None  # the model's own MossModel, except an offload-cpu plan's segments
    if plan.hybrid:
        weights, net = build_hybrid(store, plan, get_jittor(device), dtype, compute_dtype=compute_dtype)
    elif plan.streams or device == "cuda":  # cuda: resident weights go straight to device memory (engine.cuda)
        weights = build_weights(store, plan, get_jittor(device), dtype)
    elif dtype == "float16":  # the store's mapped pages, or a copy in 2 MiB pages (weight_pages): read
        # and hashed by threads that need no GIL while jittor imports and the kernels load in this one
        groups = [*range(store.config.n_layer), layout.HEAD]
        pages = weight_pages(sum(store.group_data_span(g)[1] for g in groups), available_host)

        def read() -> dict | None:
            if pages != "copied":
                store.map_groups(layout.all_groups(store.config))
                return None
            store.map_groups([layout.EMBED])  # the embedding stays mapped: decode reads a row a token
            return read_huge_pages(store, groups)

        with ThreadPoolExecutor(1, thread_name_prefix="jmoss-load") as pool:
            reading = pool.submit(read)
            jt = get_jittor(device)
            pick_ops(jt, device, dtype, compute_dtype)
            copied = reading.result()
        weights = ResidentWeights.from_store(jt, store, dtype, copied=copied, copy_later=pages == "copy later")
    else:  # float32: read once into memory the Vars share, widened (never twice the weights)
        weights = ResidentWeights.from_store(get_jittor(device), store, dtype)
    model = _with_tokenizer(Model(store.config, _embed(store), weights=weights, plan=plan, net=net, **common),
                            tokenizer)
    warm_up(model)  # the first load of this model compiles every kernel its forwards use, now
    return model


def _embed(store) -> dict:
    """The embedding group: mapped store pages on the host, where decode touches one row per token."""
    return {layout.EMBED: store.group(layout.EMBED)}


def _store_tokenizer(store) -> "Tokenizer":
    """The store's tokenizer, or a TokenizerError saying the store has none (before any weight is read)."""
    from jmoss.errors import TokenizerError
    from jmoss.store import TOKENIZER_FILES, repair_hint
    from jmoss.tokenizer import load_tokenizer

    if not any(name in store.manifest["files"] for name in TOKENIZER_FILES):
        raise TokenizerError(
            f"the store {store.path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}), so it cannot read or "
            "write text; its weights were not loaded. Convert the model from a folder or Hugging Face repo that has "
            f"them ({repair_hint(store.path, store.manifest, 'to rewrite it')}), or give token ids through the "
            "Python API (jmoss.load(...).logits / .session)"
        )
    return load_tokenizer(store.path)


def _with_tokenizer(model: Model, tokenizer: "Tokenizer | None") -> Model:
    if tokenizer is not None:
        model._tokenizer = tokenizer
    return model
