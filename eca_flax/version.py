"""The package version (a leaf module: model.json and the run metadata record it)."""

__version__ = "0.1.0"
