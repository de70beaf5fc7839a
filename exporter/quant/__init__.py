"""Per-target weight quantisers (each with the eager twin of what its artifact stores)."""
