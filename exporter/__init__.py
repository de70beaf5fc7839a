"""cpm-mobile exporter: checkpoint -> export-friendly module -> passes -> artifacts."""

__version__ = "0.1.0"
