"""Building blocks shared by the models: attention and its caches, and (later) neurons and cells."""
