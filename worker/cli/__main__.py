"""``python -m worker.cli``: the same command as ``synthguard``."""

from . import main

main()
