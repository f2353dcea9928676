"""``python -m tools.linux_guest``: see :mod:`tools.linux_guest.cli`."""

from tools.linux_guest.cli import main

raise SystemExit(main())
