"""The one exception tree of Sysgram.

Every error that a user can cause (a bad rule file, profile, model, config, recording or webhook answer)
is a :class:`SysgramError` that names the file and, where known, the line and column it is about.
``agent.cli`` is the only place that turns one into a message and an exit code; nothing else exits.
"""

from __future__ import annotations


class SysgramError(Exception):
    """Base of every error Sysgram raises on purpose.

    ``str(err)`` is one line: ``path:line:col: message`` (the parts that are known).
    """

    exit_code = 2

    def __init__(
        self, message: str, *, path: str | None = None, line: int | None = None, col: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.line = line
        self.col = col

    @property
    def where(self) -> str:
        parts = [p for p in (self.path, self.line, self.col) if p is not None]
        return ":".join(str(p) for p in parts)

    def __str__(self) -> str:
        where = self.where
        return f"{where}: {self.message}" if where else self.message


class ConfigError(SysgramError):
    """A config file (YAML) or a command-line option is wrong."""


class RecordingError(SysgramError):
    """A recording is truncated, foreign, or of an unknown format version."""


class ModelError(SysgramError):
    """A model or its sidecar is missing, corrupt, or does not match."""


class RulesError(SysgramError):
    """A Falco-format rules file cannot be loaded."""


class ProfileError(SysgramError):
    """A seccomp profile is invalid."""


class CaptureError(SysgramError):
    """The BPF tracer could not be loaded or attached (no root, no BTF, no headers...)."""

    exit_code = 3


class DeliveryError(SysgramError):
    """An alert sink (webhook, file) answered in a way Sysgram cannot use."""


class NotYetAvailable(SysgramError):
    """An option that exists but whose feature has not landed yet."""
