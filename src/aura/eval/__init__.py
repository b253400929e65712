"""Held-out evaluation (exact perplexity, bits per byte) and training-curve plots."""
