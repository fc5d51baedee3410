"""Layer: entry points (``python -m detrkit``); imports ``cli`` only."""

import sys

from .cli import main

sys.exit(main())
