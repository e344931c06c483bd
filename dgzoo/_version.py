"""The one place the dgzoo version is written: ``pyproject.toml`` reads it at build time and ``dgzoo.__version__``
at run time, so a source tree, an editable install and a wheel always report the same version."""

__version__ = "0.2.0"
