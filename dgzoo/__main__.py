"""``python -m dgzoo``: the ``dgzoo`` command."""

import sys

from .cli import main

sys.exit(main())
