"""Per-format quantisers: each turns a CausalLM into the variant its artifact stores (and that variant is the twin)."""
