"""The base class of the errors that mean bad input, not a bug.

`ConfigError`, `CheckpointError` and `PairMismatchError` derive from it, as do
the library's other checks of what a caller passed. The `dami` command prints
such an error as one line and exits with status 2; any other exception is a bug
and keeps its traceback. It is a `ValueError`, so callers catching that still do.
"""


class InputError(ValueError):
    """Bad input: the message names what was wrong and what was expected."""


class ConfigError(InputError):
    """A config file or field is missing, malformed or unsupported."""
