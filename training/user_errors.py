"""User-facing errors: the CLI prints them as one line and exits with status 2."""

from pathlib import Path


class UsageError(ValueError):
    """Bad input (data layout, flags, missing weights) that the user must fix, not a bug."""


def make_dir(path: Path, option: str) -> Path:
    """Create the directory ``option`` names (with its parents), before any work that would be lost without it.

    A file in the way, or a place that cannot be written, is the user's to fix: one line, not a traceback.
    """
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot create the directory ({exc.strerror or exc})") from exc
    return path


class DataError(UsageError):
    """The data directory does not have the expected layout or content."""


class DivergedError(UsageError):
    """The run's loss or outputs stopped being finite: the recipe (usually its learning rate), not a bug."""
