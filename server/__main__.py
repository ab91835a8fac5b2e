"""``python -m server`` → the ``mgm`` command line."""

from server.cli import main

raise SystemExit(main())
