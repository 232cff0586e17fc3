"""``python -m flux_broker`` runs the ``flux-broker`` command."""

from flux_broker.cli import main

raise SystemExit(main())
