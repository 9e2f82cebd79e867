"""Pre-training data selection by unbalanced optimal transport, with two-head fine-tuning (placeholder)."""
