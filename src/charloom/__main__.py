"""``python -m charloom`` runs the CLI."""

from .cli.commands import main

raise SystemExit(main())
