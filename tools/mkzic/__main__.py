"""``python -m tools.mkzic`` (``python -m runphi_mkzic`` installed): see :mod:`.cli`."""

from .cli import main

raise SystemExit(main(prog=f"python -m {__package__}"))
