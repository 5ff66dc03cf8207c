"""``python -m flexprefill_torch demo``."""

import sys

from .cli import main

sys.exit(main())
