"""The coreml target: spec.py (typed spec, capabilities), target.py (validate, export, twin, structure), quantisers, size rule."""
