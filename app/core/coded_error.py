"""The one root of every error a client can see: a stable ``code`` and a one-line message.

Image errors (core), batcher errors and HTTP errors all derive from :class:`CodedError`, so one
exception handler, one batch-item error shape and one CSV error column serve them all. The
HTTP status of each code lives in ``app.api.errors.ERRORS``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar


class CodedError(Exception):
    """Subclasses set ``code`` and, when the message never varies, ``default_message``."""

    code: ClassVar[str] = "internal_error"
    default_message: ClassVar[str] = "unexpected server error"

    def __init__(self, message: str | None = None) -> None:
        text = self.default_message if message is None else message
        super().__init__(" ".join(text.split()))  # one line, whatever a library put in its message

    @property
    def message(self) -> str:
        return str(self)


def first_validation_error(errors: Iterable[Mapping[str, Any]], skip: Iterable[str] = ()) -> tuple[str, str, str]:
    """(location, message, type) of the first pydantic/FastAPI validation error, for one-line reports.

    ``skip`` drops location parts that mean nothing to the reader (FastAPI's ``body``, ``query``).
    """
    first = next(iter(errors))
    dropped = set(skip)
    where = ".".join(str(part) for part in first["loc"] if part not in dropped)
    message = str(first["msg"])
    raised = first.get("ctx", {}).get("error") if first["type"] == "value_error" else None
    if isinstance(raised, ValueError):
        message = str(raised)  # a validator's own words, without pydantic's "Value error, " prefix
    return where, message, str(first["type"])
