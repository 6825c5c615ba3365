"""``python -m mechicl.cli``: the same as the ``mechicl`` script."""

import sys

from mechicl.cli import main

sys.exit(main())
