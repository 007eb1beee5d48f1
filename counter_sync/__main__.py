"""``python -m counter_sync``: run the server (the same as ``counter-sync``)."""

import sys

from counter_sync.cli import main

sys.exit(main(prog="python -m counter_sync"))
