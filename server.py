#!/usr/bin/env python3
"""Run counter-sync from a checkout: ``python server.py``, with the same flags as ``counter-sync``.

The server is the ``counter_sync`` package; start reading at
``counter_sync/counter.py``.
"""

import sys

from counter_sync.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="server.py"))
