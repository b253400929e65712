"""Inference: turning a model's next-token logits into text (sampling, cached decoding)."""
