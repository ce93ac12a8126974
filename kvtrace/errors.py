"""Errors every kvtrace component raises for bad input or failed checks. No torch import.

The CLI (kvtrace/cli.py) prints `kvtrace: <label>: <message>` and exits with `exit_code`.
"""


class KvtraceError(Exception):
    """A user-facing error: the message names the file, tensor, option or manifest key and what
    would be right. Exit status 2."""

    exit_code = 2
    label = "error"


class ParityFailure(KvtraceError):
    """Parity outside tolerance. Exit status 1."""

    exit_code = 1
    label = "parity failed"


class CheckFailed(KvtraceError):
    """A check of something kvtrace wrote failed (a weight read back differs from its source).
    Exit status 1."""

    exit_code = 1
    label = "check failed"


class NonFiniteLogits(KvtraceError):
    """The model produced NaN/Inf logits for a row being sampled: its tokens would be garbage,
    so the request fails instead. Exit status 1; a server answers that request with a 500-class
    error and keeps serving (`step` and `row` say where: step 0 is the prefill's logits, step s
    the s-th decode step; row is the index in the batch)."""

    exit_code = 1
    label = "error"

    def __init__(self, message: str, *, step: int | None = None, row: int | None = None):
        super().__init__(message)
        self.step, self.row = step, row


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like SIGINT's KeyboardInterrupt so that the same
    cleanup runs (an export removes its staging directory). Exit status 143."""
