"""The one exception type that reaches users as a one-line message instead of a traceback."""


class DynamoeError(Exception):
    """A problem with the user's input: the message says what is wrong and how to fix it."""

    exit_code = 2  # what the command line exits with
