"""The one base class of the errors a user can fix: a setting, a path, a missing or damaged file.

Every CLI of the project (``python -m saga_train``, ``saga_train.retrieve``, ``saga_train.synthetic``, the
experiment scripts) prints a ``UserError`` as ``error: <message>`` and exits with status 2; any other exception is
a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error in what the user gave (or in a file on disk), with a message that says what and where."""


class ConfigError(UserError, ValueError):
    """A configuration key or value that does not exist or cannot be used."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the run needs does not exist."""
