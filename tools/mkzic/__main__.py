"""``python -m tools.mkzic``: see :mod:`tools.mkzic.cli`."""

from tools.mkzic.cli import main

raise SystemExit(main())
