"""The one exception type the CLI turns into a single line and exit code 2."""


class DifftimeError(ValueError):
    """Bad input from the user: a wrong argument, a missing or malformed file.

    The message is one line that says what is wrong and how to fix it.
    """
