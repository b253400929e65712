"""Errors the CLI turns into one line on stderr and exit code 2.

Anything raised as an ``AuraError`` is the user's input being wrong (a path, a key, a corrupt
file); every other exception is a bug in Aura and exits 1 with a traceback.
"""


class AuraError(Exception):
    """Bad input: the message is the whole story, shown without a traceback."""


class ConfigError(AuraError):
    """An unknown config key, a value of the wrong type, a missing preset or file."""


class DataError(AuraError):
    """A missing, empty, unreadable or corrupt data source, cache or tokenizer."""
