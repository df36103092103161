"""``python -m trioconv`` runs the command-line tool."""

from _trioconv_launch import main

main()
