"""Aura: brain-inspired language models on small compute."""

__version__ = "0.1.0"
