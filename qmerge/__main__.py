import sys

from qmerge.cli import main

sys.exit(main())
