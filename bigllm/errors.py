"""The project's user-facing error types.

A `BigLLMError` (or its subclass `ConfigError`) is printed by the CLI as one line, without a
traceback, and the process exits non-zero. Use them for anything a user can fix; keep `assert`
for internal invariants only.
"""


class BigLLMError(Exception):
    """A problem the user can fix; the message names the cause and the fix."""


class ConfigError(BigLLMError, ValueError):
    """Invalid configuration: unknown key, wrong type, or values that do not fit together."""


class DataError(BigLLMError, ValueError):
    """Bad input data: malformed records, missing files, inconsistent shards."""


class CheckpointError(BigLLMError):
    """A checkpoint that is missing, incomplete, or does not match the requested layout."""
