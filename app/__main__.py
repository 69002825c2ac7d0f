"""``python -m app`` / ``make serve``: validate settings, serve until SIGTERM or Ctrl-C, drain on the way out."""

from __future__ import annotations

import signal
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
    try:
        server.run()
    except KeyboardInterrupt:
        _die_of_sigint()
    return 0 if server.started else STARTUP_FAILURE


def _die_of_sigint() -> None:
    """End a Ctrl-C as uvicorn ends a SIGTERM: after the drain, killed by the signal, with no traceback.

    uvicorn re-raises the SIGINT it captured once it has shut down, and asyncio turns that into a
    KeyboardInterrupt (a 25-line traceback). Dying of the signal itself, rather than exiting 130,
    tells a calling shell the program was interrupted, so a script stops too.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.raise_signal(signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
