"""Adapters unloaded at runtime, remembered across restarts.

An unload through the API hides an adapter directory that still sits under an adapter root; without a
record, the next start would serve it again. The record is one small JSON file per set of adapter roots,
under a state directory (default `$MALORA_CACHE/state`), written atomically (temporary file, then rename).
A load of the same name through the API removes it from the record. A state directory that cannot be written
costs the record, never a request: the failure is logged and serving goes on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


class UnloadedRecord:
    def __init__(self, state_dir: Path, roots: list[Path]) -> None:
        key = hashlib.sha256("\n".join(sorted(str(r.resolve()) for r in roots)).encode()).hexdigest()[:16]
        self.path = Path(state_dir) / f"unloaded-{key}.json"
        self.roots = [str(r.resolve()) for r in roots]

    def read(self) -> set[str]:
        """The names unloaded before; an unreadable or malformed record is logged and treated as empty."""
        try:
            data = json.loads(self.path.read_text())
            names = data["unloaded"]
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError("'unloaded' is not a list of names")
            return set(names)
        except FileNotFoundError:
            return set()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring the record of unloaded adapters %s: %s", self.path, exc)
            return set()

    def write(self, names: set[str]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, temporary = tempfile.mkstemp(prefix=".unloaded-", dir=self.path.parent)
            with os.fdopen(fd, "w") as out:
                json.dump({"roots": self.roots, "unloaded": sorted(names)}, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, self.path)
        except OSError as exc:
            log.warning("cannot record the unloaded adapters in %s (they come back after a restart): %s",
                        self.path, exc)
