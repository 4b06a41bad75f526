"""``python -m tilenet`` runs the same CLI as the ``tilenet`` console script."""

import sys

from tilenet.cli import main

sys.exit(main())
