"""``python -m tilenet.train conf=conf/X.yaml key=value ...``: the training entry point."""

import sys

from tilenet.train import main

# Guarded: DDP and loader worker processes (spawn) import the main module again.
if __name__ == "__main__":
    sys.exit(main())
