"""`python -m smarthost` is the `smarthost` command."""

import sys

from .cli import main

sys.exit(main())
