"""The package version (a module of its own so that nothing imports the package
front, which imports the public API, from below)."""

__version__ = "0.1.0"
