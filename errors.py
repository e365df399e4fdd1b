"""Errors a user can cause. Each message says what is wrong and what to do about it.

The CLI prints ``str(error)`` on one line and exits with :attr:`MtregError.exit_code`;
anything that is not an :class:`MtregError` is a bug and keeps its traceback.
"""


class MtregError(Exception):
    """Base of every user-facing error: bad input, a missing thing, a refused operation."""

    exit_code = 1


class NotFound(MtregError):
    """A trunk, task, version, bundle or alias that the registry does not know."""


class AlreadyExists(MtregError):
    """A name or version that is taken and cannot be registered again."""


class InvalidName(MtregError):
    """A task, trunk or alias name that breaks the naming rule."""


class InvalidVersion(MtregError):
    """A version string that is not a semantic version, or not greater than the latest."""


class InvalidCheckpoint(MtregError):
    """A trunk folder that is not a usable BERT-family checkpoint."""


class InvalidWeights(MtregError):
    """A branch weight file that is missing, unreadable or does not match its head spec."""


class Damaged(InvalidWeights):
    """A file whose bytes or metadata differ from what the manifest or registry recorded
    for it: a bundle, export or object edited or corrupted after it was written."""


class IncompatibleTrunk(MtregError):
    """A branch trained on a trunk whose prefix differs from the registered one."""


class PluginError(MtregError):
    """A plugin that failed to load, raised in a hook or clashes with another plugin."""


class DatabaseError(MtregError):
    """A database that cannot be reached, or whose schema is older or newer than the code."""


class StorageError(MtregError):
    """A disk that is full or read-only, or a path the registry cannot write or create."""
