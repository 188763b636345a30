"""The one exception type for a user's mistake.

The CLI turns a `UserError` into one line on stderr and exit status 2; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: the message names the thing and says what to do."""


class WeightsNotFound(UserError):
    """No pretrained weights for a network on this machine (a study reports such a run, it does not stop)."""
