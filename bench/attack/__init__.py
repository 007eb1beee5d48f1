"""Rerun every attack that once broke the server, and measure what it costs now.

Each attack runs against a real ``python server.py`` (started with
``testkit.processes.ServerProcess``), and the load comes from separate processes:
this one only steers them and watches the server from outside (RSS and open
files from /proc, kernel socket memory from ``ss``, its log). Every attacker
connects from its own loopback address, because the server's caps are per
client address and Linux routes all of 127.0.0.0/8 to the loopback device.

    python3 -m bench.attack                      # every attack, a few minutes
    python3 -m bench.attack --only flood,stall   # some of them
    python3 -m bench.attack --help               # every flag, with its default

It prints one table, each figure next to its target with PASS or FAIL, and a
table of memory per connection; it writes the figures and every detail to
``bench/results/attack.json`` and each server's log to
``bench/results/attack-logs/`` (both ignored by git). The exit status is 1 when
a target failed. ``bench/README.md`` says what each attack does.

The parts: the attackers, each in its own process (``raw``: plain sockets;
``clients``: asyncio), steered over a pipe (``channel``); the server under
attack (``subject``); the attacks (``readers``: 1 and 2, ``admission``: 3 to
6, ``memory``: 7 and 8) and what they share (``run``); the figures and
tables (``figures``); the command line (``__main__``).
"""
