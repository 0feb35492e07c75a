"""Errors a user can fix (bad input, missing files); the CLI prints them on one line and exits 2."""


class ExlqError(Exception):
    """A problem with the user's input or environment, with a message that says what to do.

    Anything raised as ExlqError is shown without a traceback; any other exception is a bug (exit 1).
    """
