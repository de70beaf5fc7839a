"""Quantisers, one module per artifact format, each with the twin of what its artifact stores."""
