"""``python -m trioconv`` runs the command-line tool."""

from .cli import main

main()
