"""`python -m mocoretrieval` is the `mocoretrieval` command."""

import sys

from .cli import main

sys.exit(main())
