"""Data room: tokenizers, sources, pretokenized memmap shards + manifest, batch sampling."""
