"""What the tests and the benchmark share: real upstreams (sinks), the relay in-process
and as a real process, SMTP clients, config writers, log readers, spool and process
probes. One module a role; the fixtures that use them live in tests/conftest.py.

Importable as `support` from the tests (pytest puts tests/ on sys.path, as for
conftest) and from bench/bench.py (which puts tests/ there itself).
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent  # the repository
