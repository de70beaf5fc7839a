"""The artifact targets, one package each (registry.py lists them). Importing this package loads nothing heavy."""
