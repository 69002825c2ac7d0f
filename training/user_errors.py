"""User-facing errors: the CLI prints them as one line and exits with status 2."""


class UsageError(ValueError):
    """Bad input (data layout, flags, missing weights) that the user must fix, not a bug."""


class DataError(UsageError):
    """The data directory does not have the expected layout or content."""


class DivergedError(UsageError):
    """The run's loss or outputs stopped being finite: the recipe (usually its learning rate), not a bug."""
