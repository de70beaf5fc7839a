"""Training of the embedded fixture models (corpus, tokenizer, BlockFFN sparsity losses, the run)."""
