"""The brain's regions for `natural_brain` (aura.models.natural_brain), one small module each.

Each holds its own state explicitly (buffers, or a cache the caller owns), is built only when
its switch is on, and reports what it did in the last forward through ``metrics()``.
"""
