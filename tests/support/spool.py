"""The spool on disk as the tests look at it."""

from __future__ import annotations

from pathlib import Path


def spool_files(root: Path) -> dict[str, list[str]]:
    """Names in each spool directory, for assertions."""
    return {
        d.name: sorted(p.name for p in d.iterdir()) for d in sorted(root.iterdir()) if d.is_dir()
    }


def spool_drained(spool: Path, *also: str) -> bool:
    """No message left anywhere a delivery could still come from (msg/, queue/,
    active/), nor in the directories named in `also` (e.g. "tmp")."""
    files = spool_files(spool)
    return not any(files[name] for name in ("msg", "queue", "active", *also))
