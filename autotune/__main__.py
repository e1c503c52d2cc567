"""``python -m autotune`` runs the command line (where the ``autotune`` script is not on PATH)."""

from autotune.cli import main

main()
