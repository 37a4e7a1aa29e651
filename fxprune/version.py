"""fxprune's version (one place: the package, the file format's header and ``pyproject.toml`` agree)."""

__version__ = "0.1.0"
