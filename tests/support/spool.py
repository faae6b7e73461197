"""The spool on disk as the tests look at it."""

from __future__ import annotations

from pathlib import Path


def spool_files(root: Path) -> dict[str, list[str]]:
    """Names in each spool directory, for assertions."""
    return {
        d.name: sorted(p.name for p in d.iterdir()) for d in sorted(root.iterdir()) if d.is_dir()
    }
