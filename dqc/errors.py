"""The one exception type the scripts turn into a one-line message."""


class DQCError(Exception):
    """A problem with the user's input: printed as one line, exit status 2, no traceback."""
