"""The one exception type for bad input: the CLI prints it as a single line and exits non-zero."""


class UserError(Exception):
    """Bad input from the user (a file, a value, a setting): the message names it and says what is wrong."""
