"""The one exception type that means "the user gave bad input": the CLI prints it and exits 2."""


class UserError(Exception):
    """Bad input or environment the user can fix. ``str(err)`` is one line saying what to do."""
