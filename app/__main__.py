"""``python -m app`` / ``make serve``: validate settings, then serve until SIGTERM, draining on the way out."""

from __future__ import annotations

import sys

from app.api.factory import create_app
from app.api.server import DrainingServer, server_config
from app.logs import configure_logging
from app.settings import SettingsError, load_settings

STARTUP_FAILURE = 3


def main() -> int:
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"cxr-pneumonia: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings)
    server = DrainingServer(server_config(app, settings), on_exit=app.state.service.begin_drain)
    server.run()
    return 0 if server.started else STARTUP_FAILURE


if __name__ == "__main__":
    sys.exit(main())
