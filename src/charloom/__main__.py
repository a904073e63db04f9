"""``python -m charloom`` runs the CLI."""

from .cli import main

raise SystemExit(main())
