"""Where the project caches what it builds once per machine: converted models, the native kernel, server state."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$MALORA_CACHE`, else `~/.cache/malora`."""
    return Path(os.environ.get("MALORA_CACHE", Path.home() / ".cache" / "malora"))
