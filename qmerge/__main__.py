"""`python -m qmerge`: the same entry point as the `qmerge` console script (qmerge/cli.py `main`)."""

import sys

from qmerge.cli import main

sys.exit(main())
