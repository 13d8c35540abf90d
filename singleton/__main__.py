"""``python -m singleton``: the same as the ``singleton`` command."""

from singleton.cli import main

main()
