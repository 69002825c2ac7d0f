"""ASGI entry point for ``uvicorn app.main:app``; ``python -m app`` (the Docker image's command) is preferred:
only it installs the HTTP protocol with the header size and time limits (``app.api.http_protocol``).

Settings are read and logging configured at import, as uvicorn imports this module once per
process; the model itself loads in the app's lifespan, not here.
"""

from __future__ import annotations

import sys

from fastapi import FastAPI

from app.api.factory import create_app
from app.logs import configure_logging
from app.settings import SettingsError, load_settings

__all__ = ["app", "create_app"]


def _app_from_environment() -> FastAPI:
    try:
        settings = load_settings()
    except SettingsError as exc:
        sys.exit(f"cxr-pneumonia: {exc}")
    configure_logging(settings.log_level, settings.log_format)
    return create_app(settings)


app = _app_from_environment()
