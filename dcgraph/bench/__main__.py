"""``python -m dcgraph.bench ...``: the same as ``dcgraph bench ...``."""

import sys

from .run import main

sys.exit(main())
