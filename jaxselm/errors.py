"""The package's error types.

Every mistake a user can fix (a bad config value, a malformed dataset row, a broken checkpoint,
an unreadable tokenizer file, an unparseable judge reply, a bad CLI argument) raises a subclass of
:class:`JaxselmError` whose message is one line naming the culprit (field, file, row). The CLI
prints that line and exits with status 2.
"""

from __future__ import annotations


class JaxselmError(Exception):
    """Base class of errors caused by user input; the message names the culprit in one line."""


class ConfigError(JaxselmError, ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range.

    ``path`` (the key's path inside the config section that raised it) and ``detail`` (the
    message without the key) let an enclosing section re-prefix the key with its own path.
    """

    def __init__(
        self, message: str, *, path: tuple[str, ...] | None = None, detail: str | None = None
    ):
        super().__init__(message)
        self.path = path
        self.detail = detail


class DataError(JaxselmError, ValueError):
    """A dataset file or row is malformed."""


class CheckpointError(JaxselmError):
    """A checkpoint is missing, corrupted or does not match the model."""


class TokenizerError(JaxselmError):
    """A tokenizer file is missing or malformed."""


class JudgeError(JaxselmError):
    """A judge is misconfigured or replied with something that cannot be used."""
