"""``python -m avatar.cli`` runs the command line."""

from . import main

main()
