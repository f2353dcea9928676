"""``python -m runphi``: the same program as the ``runphi`` console script."""

from runphi.cli import main

main()
