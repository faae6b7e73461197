"""`python -m faults ARGS...`: the `smarthost` command line with the fault hook installed
(rules from $SMARTHOST_FAULTS; see the package docstring)."""

from __future__ import annotations

import sys

import faults

faults.install()

from smarthost.cli import main  # noqa: E402  (after the hook, like a sitecustomize)

sys.exit(main(sys.argv[1:]))
