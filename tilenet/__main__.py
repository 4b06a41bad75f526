"""``python -m tilenet`` runs the same CLI as the ``tilenet`` console script."""

import sys

from tilenet.cli import main

# Guarded: dask worker processes (spawn) import the main module again.
if __name__ == "__main__":
    sys.exit(main())
