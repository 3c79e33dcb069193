import sys

from qmerge.runtime import set_process_defaults

set_process_defaults()  # before torch is imported (qmerge/runtime.py says why)

from qmerge.cli import main  # noqa: E402 - after the settings above

sys.exit(main())
