"""Typed exceptions for kolm_ray.

Inner code raises these; only the CLI (``kolm_ray.cli``) turns them into exit
codes. Each class carries the exit code a user sees:

* ``InputError``   -> 2: bad arguments or a bad input file (the message names file and line).
* ``KolmRuntimeError`` -> 1: a failure while running (teacher outage past its threshold, ...).
* ``ServiceUnreachable`` -> 1: a service the compile needs (the Hugging Face hub, the Ray cluster,
  an object store) cannot be reached or refused us; the preflight raises it before anything is paid.
* ``BudgetExceeded`` -> 1: a tenant's teacher budget or a compile's ``--max-cost`` would be passed.
* ``GateFailed``   -> 3: the K-score gate was not met.
"""

from __future__ import annotations


class KolmError(Exception):
    """Base of every error kolm_ray raises on purpose."""

    exit_code = 1


class InputError(KolmError):
    """Bad arguments or bad input data; the message says what, where and how to fix it."""

    exit_code = 2

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None):
        self.path = path
        self.line = line
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(f"{where}{message}")


class KolmRuntimeError(KolmError):
    """A failure while running, not caused by the user's input."""

    exit_code = 1


class TeacherError(KolmRuntimeError):
    """The teacher stage failed past its stated threshold."""


class ServiceUnreachable(KolmRuntimeError):
    """A service the compile needs cannot be reached or refused this client: the Hugging Face hub
    for a base that is not cached, the Ray cluster (nothing listens, or its token auth), an object
    store. The message names the service, the address and the fix."""


class GateFailed(KolmError):
    """The K-score gate was not met."""

    exit_code = 3


class BudgetExceeded(KolmRuntimeError):
    """A teacher budget would be passed: a tenant's (set by the operator) or a compile's own
    ``--max-cost``. Raised before the call is paid for; answers already received stay cached."""

    exit_code = 1
