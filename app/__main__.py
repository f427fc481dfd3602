"""``python -m app --index DIR``: the same as ``mocoretrieval serve --index DIR``."""

from __future__ import annotations

import sys

from mocoretrieval.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
