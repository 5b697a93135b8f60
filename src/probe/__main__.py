"""``python -m probe``: the same as the ``probe`` command."""

from probe.cli import main

raise SystemExit(main())
