"""The one exception type the CLI turns into `error: ...` and exit code 2."""


class UserError(Exception):
    """A problem with the user's input (model name, file, option): shown as one line, no traceback."""
