"""``python -m dcgraph.cli ...``: the same as ``dcgraph ...``."""

import sys

from . import main

sys.exit(main())
