"""``python -m training`` runs the CLI."""

from training.cli import main

raise SystemExit(main())
