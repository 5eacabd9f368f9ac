"""``python -m mongofeed`` runs the command line."""

from .tools.cli import main

if __name__ == "__main__":
    main()
