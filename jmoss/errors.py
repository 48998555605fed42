"""Errors jmoss raises to its users.

Every error a user can cause (bad input, bad files, budgets that cannot work) is a
``JmossError`` whose message says what went wrong and what to do about it, so the CLI can
print it without a traceback and scripts can catch one type.
"""

from __future__ import annotations


class JmossError(Exception):
    """Base class of every error jmoss raises on purpose."""


class ConfigError(JmossError):
    """A model config.json is missing, malformed or describes an unsupported model."""


class CheckpointError(JmossError):
    """A source checkpoint cannot be read: missing shard, truncated or corrupt file."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle inside a checkpoint asks for something other than tensors; nothing was executed."""


class StoreError(JmossError):
    """A converted jmoss store is missing, incomplete or fails verification."""


class ModelNotFoundError(StoreError):
    """A model name or path does not lead to a converted store."""


class BudgetError(JmossError):
    """A memory budget is malformed or too small to run the model."""


class DeviceError(JmossError):
    """The requested device (e.g. CUDA) is not usable on this machine."""


class ContextLengthError(JmossError):
    """A sequence would run past the model's maximum number of positions."""


class TokenizerError(JmossError):
    """Tokenizer files are missing or malformed."""


class GenerationError(JmossError):
    """Generation options are invalid."""


class PluginError(JmossError):
    """A plugin is unknown, misconfigured or failed to load."""


class DialogueError(JmossError):
    """Prompt text does not follow MOSS's dialogue format (a field tag, space or end marker is missing)."""


class CalculationError(PluginError):
    """A Calculate expression is not bounded real arithmetic; MOSS is shown 'No result.'."""


class SolverError(PluginError):
    """A Solve request cannot be parsed or solved within its bounds; MOSS is shown 'No result.'."""


class ConstraintError(JmossError):
    """An output constraint (a JSON schema, a grammar) is malformed or uses a feature jmoss cannot enforce."""


class NotConvertedError(ModelNotFoundError):
    """A Hugging Face model name that has no converted store here yet: ``jmoss pull`` makes one."""

    def __init__(self, message: str, name: str, variant: str | None = None):
        super().__init__(message)
        self.name, self.variant = name, variant
