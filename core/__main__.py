"""``python -m avatar`` runs the command line."""

from .cli import main

main()
