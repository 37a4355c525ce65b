"""The one exception type the CLI turns into a single line and exit code 2."""


class DifftimeError(ValueError):
    """Bad input from the user: a wrong argument, a missing or malformed file.

    The message is one line that says what is wrong and how to fix it.
    """


def located_error(where: str, msg: str) -> DifftimeError:
    """One-line error prefixed by where it happened: the CLI prints it as is, so newlines would garble it."""
    text = f"{where}: {msg}" if where else msg
    return DifftimeError(text.replace("\r", " ").replace("\n", " "))
