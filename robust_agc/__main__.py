"""``python -m robust_agc`` = ``robust-agc``."""

import sys

from .cli import main

sys.exit(main())
