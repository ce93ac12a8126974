"""Errors every kvtrace component raises for bad input. No torch import."""


class KvtraceError(Exception):
    """A user-facing error: the message names the file, tensor or option and what is expected.

    The CLI prints it as `kvtrace: error: ...` and exits with status 2.
    """


class ParityFailure(KvtraceError):
    """Parity outside tolerance (exit status 1)."""
