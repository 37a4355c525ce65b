"""The one exception type the CLI turns into a single line and exit code 2."""


class DifftimeError(ValueError):
    """Bad input from the user: a wrong argument, a missing or malformed file.

    The message is one line that says what is wrong and how to fix it. It is a ``ValueError``, so
    callers that already catch bad values catch it too.

    >>> import difftime as dt
    >>> issubclass(dt.DifftimeError, ValueError)
    True
    >>> try:
    ...     dt.load_data("nope")
    ... except dt.DifftimeError as exc:
    ...     print(exc)
    nope: unknown data source 'nope'; expected one of toy:..., digits, mnist, ...
    """


def located_error(where: str, msg: str) -> DifftimeError:
    """One-line error prefixed by where it happened: the CLI prints it as is, so newlines would garble it."""
    text = f"{where}: {msg}" if where else msg
    return DifftimeError(text.replace("\r", " ").replace("\n", " "))
