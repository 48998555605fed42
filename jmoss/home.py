"""Where jmoss keeps its own files, in one place that imports nothing of jmoss.

The store (converted models), the CUDA 13 fix (patched Jittor copy), benchmarks and jittor_setup
all need this root; keeping it out of jittor_setup means none of them depends on Jittor's set-up.
"""

from __future__ import annotations

import os
from pathlib import Path


def jmoss_home() -> Path:
    """Root of jmoss's own files: converted models and caches (``$JMOSS_HOME`` overrides)."""
    env = os.environ.get("JMOSS_HOME")
    if env:
        return Path(env).expanduser().resolve()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser().resolve() / "jmoss"
