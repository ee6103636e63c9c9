"""The one exception type the scripts turn into a one-line message, and a library error's reason."""


class DQCError(Exception):
    """A problem with the user's input: printed as one line, exit status 2, no traceback."""


def error_reason(exc: BaseException, default: str | None = None, *, first_line: bool = False,
                 limit: int = 160) -> str:
    """A library error's reason in one short line, for a `DQCError` message.

    The last line of the message (SimpleITK's multi-line errors end in the reason), or the
    first with `first_line` (Keras, pandas: a summary first); `default`, else the exception's
    type name, when the message is empty.
    """
    text = str(exc).strip()
    if not text:
        return type(exc).__name__ if default is None else default
    lines = text.splitlines()
    return (lines[0] if first_line else lines[-1])[:limit]
