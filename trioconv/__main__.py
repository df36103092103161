"""``python -m trioconv`` runs the command-line tool."""

from ._launch import main

main()
