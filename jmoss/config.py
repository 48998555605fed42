"""MossConfig: the model hyper-parameters, read from a Hugging Face config.json.

MOSS (model_type "moss") and Salesforce CodeGen (model_type "codegen") share one architecture,
so one config class serves both. Unknown keys (GPT-2 leftovers such as ``summary_*``) are
ignored; values that would make the model ill-formed are rejected here with a clear message
rather than surfacing later as a shape error deep in a matmul.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from jmoss.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("moss", "codegen")

# CodeGen's fused qkv projection was laid out for 4 TPU shards; the split needs n_head % 4 == 0.
QKV_SHARDS = 4

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
                f"unsupported model_type {self.model_type!r}: jmoss runs MOSS and CodeGen models "
                f"(model_type one of {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "rotary_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name} must be a positive integer, got {value!r}")
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner <= 0):
            raise ConfigError(f"config field n_inner must be null or a positive integer, got {self.n_inner!r}")
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
                f"activation_function {self.activation_function!r} is not supported (MOSS/CodeGen use gelu_new)"
            )
        if self.tie_word_embeddings:
            raise ConfigError("tie_word_embeddings=true is not supported: MOSS/CodeGen have an untied lm_head")
        if self.wbits not in (4, 8, 32) and self.wbits != 16:
            raise ConfigError(f"wbits must be 4, 8 or 32 (unquantized), got {self.wbits!r}")

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
        for key in ("layer_norm_epsilon",):
            if key in values:
                values[key] = float(values[key])
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
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """The HF-style dict written into a jmoss store (n_inner resolved, aliases dropped)."""
        data = dataclasses.asdict(self)
        data["n_ctx"] = self.n_positions
        return data
