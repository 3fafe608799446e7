"""Every error a Simic command can end with, in one leaf module (it imports nothing of esper).

A :class:`UsageError` is printed as ``error: what (where); what is allowed`` with exit status 2
(:func:`esper.simic.preflight.run_cli`); the others are what the checks raise before they are
turned into one.
"""

from __future__ import annotations

import signal

EXIT_USAGE = 2
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


class UsageError(Exception):
    """An input refused before any work: ``what``, ``where``, ``allowed``."""

    def __init__(self, what: str, where: str, allowed: str) -> None:
        what = " ".join(what.split())  # one stderr line, whatever a library's message spans
        self.what, self.where, self.allowed = what, where, allowed
        super().__init__(f"error: {what} ({where}); {allowed}")


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; raised at the end of the epoch it arrived in."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        return EXIT_SIGNAL.get(signal.Signals(self.signum), 128 + self.signum)


class ConfigError(ValueError):
    """A configuration file, preset or value is invalid; the message names the field."""


class CheckpointError(ValueError):
    """A checkpoint is unreadable, corrupt, or does not match the run it is loaded into."""


class PackError(ValueError):
    """A pack is missing, unreadable, or not an Esper episode pack of a readable version."""


class PackSchemaError(PackError):
    """A pack's observation schema differs from the code's (the message names the fields)."""


class RankLost(RuntimeError):
    """A collective failed or timed out: another rank died or stalled, the run cannot go on."""
