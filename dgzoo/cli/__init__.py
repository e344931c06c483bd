"""The ``dgzoo`` command line (one module per verb group; :mod:`dgzoo.cli.app` builds the parser)."""

from .app import build_parser, main, run

__all__ = ["build_parser", "main", "run"]
