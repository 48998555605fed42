"""MossConfig: the model hyper-parameters, read from a Hugging Face config.json.

MOSS (model_type "moss") and Salesforce CodeGen (model_type "codegen") share one architecture,
so one config class serves both. Unknown keys (GPT-2 leftovers such as ``summary_*``) are
ignored; values that would make the model ill-formed are rejected here with a clear message
rather than surfacing later as a shape error deep in a matmul.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from jmoss.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("moss", "codegen")

# CodeGen's fused qkv projection was laid out for 4 TPU shards; the split needs n_head % 4 == 0.
QKV_SHARDS = 4

# Upper bounds far above any real MOSS/CodeGen (moss-moon-003: vocab 107008, d 6144, 34 layers) that
# keep a hostile config.json from sizing lists, files or buffers by the billion before any check.
LIMITS = {
    "vocab_size": 1 << 22,
    "n_positions": 1 << 20,
    "n_embd": 1 << 16,
    "n_layer": 1024,
    "n_head": 1024,
    "rotary_dim": 1 << 16,
    "n_inner": 1 << 18,
}
MAX_TOKEN_ID = (1 << 31) - 1
MAX_CONFIG_BYTES = 16 << 20  # real config.json files are ~1 KB

_ALIASES = {
    "max_position_embeddings": "n_positions",
    "hidden_size": "n_embd",
    "num_attention_heads": "n_head",
    "num_hidden_layers": "n_layer",
}


@dataclasses.dataclass(frozen=True)
class MossConfig:
    """Hyper-parameters of a MOSS / CodeGen model (defaults are moss-moon-003's class defaults)."""

    vocab_size: int = 107008
    n_positions: int = 2048
    n_embd: int = 4096
    n_layer: int = 28
    n_head: int = 16
    rotary_dim: int = 64
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    bos_token_id: int | None = 106028
    eos_token_id: int | None = 106068
    tie_word_embeddings: bool = False
    model_type: str = "moss"
    wbits: int = 32
    groupsize: int = 128
    # Packed stores only (wbits 4/8): lm_head's and wte's width, 32 = kept fp16; None = the
    # converter's default (8 bits for both: jmoss.layout.HEAD_BITS, EMBED_BITS). Not in HF configs.
    head_wbits: int | None = None
    embed_wbits: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        """Width of the MLP; ``n_inner: null`` in config.json means 4 * n_embd."""
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def validate(self) -> None:
        """Reject configs the CodeGen/MOSS architecture cannot run."""
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {_show(self.model_type)}: jmoss runs MOSS and CodeGen models "
                f"(model_type one of {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "rotary_dim"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ConfigError(f"config field {name} must be a positive integer, got {_show(value)}")
            if value > LIMITS[name]:
                raise ConfigError(f"config field {name}={value} is beyond any MOSS/CodeGen model (limit {LIMITS[name]}); the config.json is wrong")
        if self.n_inner is not None and (not _is_int(self.n_inner) or not 0 < self.n_inner <= LIMITS["n_inner"]):
            raise ConfigError(f"config field n_inner must be null or a positive integer up to {LIMITS['n_inner']}, got {_show(self.n_inner)}")
        eps = self.layer_norm_epsilon
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or not 0 < eps < 1:
            raise ConfigError(f"config field layer_norm_epsilon must be a finite number in (0, 1), got {_show(eps)}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_TOKEN_ID):
                raise ConfigError(f"config field {name} must be null or a token id (an integer >= 0), got {_show(value)}")
        for name in ("model_type", "activation_function"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"config field {name} must be a string, got {_show(getattr(self, name))}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"config field tie_word_embeddings must be true or false, got {_show(self.tie_word_embeddings)}")
        if not _is_int(self.wbits):
            raise ConfigError(f"config field wbits must be an integer, got {_show(self.wbits)}")
        if not _is_int(self.groupsize) or not -1 <= self.groupsize <= LIMITS["n_inner"]:
            raise ConfigError(f"config field groupsize must be -1 or a positive integer, got {_show(self.groupsize)}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % QKV_SHARDS:
            raise ConfigError(
                f"n_head ({self.n_head}) must be divisible by {QKV_SHARDS}: the fused qkv_proj of "
                "MOSS/CodeGen is split into 4 shards of (query, value, key)"
            )
        if self.rotary_dim > self.head_dim:
            raise ConfigError(f"rotary_dim ({self.rotary_dim}) must not exceed head_dim ({self.head_dim})")
        if self.rotary_dim % 2:
            raise ConfigError(f"rotary_dim ({self.rotary_dim}) must be even: rotary rotates pairs of dims")
        if self.activation_function != "gelu_new":
            raise ConfigError(
                f"activation_function {_show(self.activation_function)} is not supported (MOSS/CodeGen use gelu_new)"
            )
        if self.tie_word_embeddings:
            raise ConfigError("tie_word_embeddings=true is not supported: MOSS/CodeGen have an untied lm_head")
        if self.wbits not in (4, 8, 32) and self.wbits != 16:
            raise ConfigError(f"wbits must be 4, 8 or 32 (unquantized), got {_show(self.wbits)}")
        for name in ("head_wbits", "embed_wbits"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value not in (4, 8, 32)):
                raise ConfigError(f"config field {name} must be null, 4, 8 or 32 (fp16), got {_show(value)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MossConfig":
        """Build from a config.json dict, applying HF's attribute aliases and ignoring unknown keys."""
        if not isinstance(data, dict):
            raise ConfigError("config.json must contain a JSON object")
        values: dict[str, Any] = {}
        fields = {f.name for f in dataclasses.fields(cls)}
        for key, value in data.items():
            key = _ALIASES.get(key, key)
            if key in fields:
                values[key] = value
        if "model_type" not in data:
            raise ConfigError("config.json has no model_type; expected \"moss\" or \"codegen\"")
        if "n_ctx" in data and "n_positions" not in data:
            values["n_positions"] = data["n_ctx"]
        try:
            return cls(**values)
        except TypeError as exc:  # wrong value types the dataclass could not take
            raise ConfigError(f"malformed config.json: {exc}") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> "MossConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_CONFIG_BYTES + 1)
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path} is over {MAX_CONFIG_BYTES >> 20} MiB; a config.json is a few KB: the file is wrong")
        return cls.from_dict(parse_json_bytes(raw, path, ConfigError))

    def to_dict(self) -> dict[str, Any]:
        """The HF-style dict written into a jmoss store (n_inner resolved, aliases dropped)."""
        data = dataclasses.asdict(self)
        data["n_ctx"] = self.n_positions
        for name in ("head_wbits", "embed_wbits"):  # only packed stores write them (fp16 stores unchanged)
            if data[name] is None:
                del data[name]
        return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: Any) -> str:
    """A short repr for error messages (a hostile value may be huge)."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        return "an integer too large to print"
    return text if len(text) <= 80 else text[:77] + "..."


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_json_bytes(raw: bytes, path: str | Path, error: type[Exception] = ConfigError) -> Any:
    """Strict JSON of a file from a checkpoint or store: UTF-8, no NaN/Infinity, no duplicate keys.

    Every way a hostile file can fail (bad UTF-8, nesting deep enough to exhaust the recursion
    limit, an integer with thousands of digits) ends in one ``error`` naming the file.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not UTF-8 text (byte {exc.start}); the file is corrupt or not JSON") from None
    try:
        return json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise error(f"{path} nests JSON too deeply to be a real file; refused") from None
    except ValueError as exc:  # JSONDecodeError, duplicate keys, NaN, oversized integers
        raise error(f"{path} is not valid JSON: {str(exc)[:200]}") from None
