"""jmoss: run MOSS (moss-moon-003) and CodeGen models with Jittor on ordinary hardware.

    import jmoss
    model = jmoss.load("fnlp/moss-moon-003-sft", device_memory="12GiB")
    print(model.generate("<|Human|>: Hi<eoh>\n<|MOSS|>:", max_new_tokens=32))

Importing jmoss does not import jittor; that happens when a model is loaded.
"""

from __future__ import annotations

__version__ = "0.1.0"

import os as _os

# setup.py installs the top-level converters/ and kernels/ as jmoss.converters and jmoss.kernels.
# Run from a source checkout (python -m jmoss.cli in the repository root), they sit beside this
# package instead: look for subpackages there too, so both layouts import the same way.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "converters")) and _os.path.isfile(
    _os.path.join(_root, "converters", "__init__.py")
):
    __path__.append(_root)

from jmoss.config import MossConfig
from jmoss.errors import JmossError

__all__ = ["__version__", "JmossError", "MossConfig", "load", "load_tokenizer", "Model", "pull", "list_models",
           "remove"]


def __getattr__(name: str):
    # Lazy: keeps `import jmoss` and `jmoss --help` fast and free of jittor's start-up.
    if name in ("load", "Model"):
        from jmoss import api

        return getattr(api, name)
    if name in ("pull", "list_models", "remove"):  # model management (jmoss pull / list / rm)
        from jmoss import models

        return getattr(models, name)
    if name == "load_tokenizer":
        from jmoss.tokenizer import load_tokenizer

        return load_tokenizer
    raise AttributeError(f"module 'jmoss' has no attribute {name!r}")
