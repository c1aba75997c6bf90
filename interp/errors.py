"""The exception types the CLI turns into `error: ...` and exit code 2."""


class UserError(Exception):
    """A problem with the user's input (model name, file, option): shown as one line, no traceback."""


class NotApplicable(UserError):
    """An analysis that cannot run on this model's architecture; raised before any heavy work."""

    def __init__(self, analysis: str, family: str, reason: str):
        super().__init__(f"{analysis} does not apply to {family}: {reason}")
        self.analysis, self.family, self.reason = analysis, family, reason
