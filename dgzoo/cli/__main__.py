"""``python -m dgzoo.cli``: the ``dgzoo`` command."""

import sys

from .app import main

sys.exit(main())
