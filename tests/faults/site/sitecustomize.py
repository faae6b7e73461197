"""Puts the fault hook (tests/faults) into every interpreter started with
``$SMARTHOST_FAULTS`` set and this directory and ``tests`` on PYTHONPATH: the relay,
its delivery process, a queue command. Nothing happens without the variable."""

import os

if os.environ.get("SMARTHOST_FAULTS"):
    import faults

    faults.install()
