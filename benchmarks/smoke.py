"""The ``--smoke`` option every benchmark script takes: tiny sizes that check the script still runs end to end
(tests/test_benchmarks.py runs each one so), not a measurement: its numbers mean nothing."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

HELP = "tiny sizes and a few steps: checks that the script runs end to end (CI); its numbers mean nothing"


def add_smoke(parser: argparse.ArgumentParser) -> None:
    """Add ``--smoke`` to a benchmark's parser."""
    parser.add_argument("--smoke", action="store_true", help=HELP)


def apply_smoke(args: argparse.Namespace, **tiny: Any) -> argparse.Namespace:
    """With ``--smoke``, override ``args`` with the ``tiny`` values (a value ``TMP`` is a fresh temporary folder)."""
    if getattr(args, "smoke", False):
        for key, value in tiny.items():
            setattr(args, key, Path(tempfile.mkdtemp(prefix="dgzoo-smoke-")) if value == TMP else value)
        print(f"--smoke: {', '.join(f'{k}={getattr(args, k)}' for k in tiny)} (numbers mean nothing)", flush=True)
    return args


TMP = "<temporary folder>"
