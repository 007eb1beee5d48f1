"""What the tests and the bench share: child processes, free ports, a raw WebSocket client.

Plain code, no pytest: ``tests/`` builds its fixtures on it and ``bench/``
drives real servers with it. It is not part of the wheel.

- :mod:`testkit.processes`: ``python server.py`` and ``redis-server`` as
  child processes whose log a thread keeps reading, free ports, system programs.
- :mod:`testkit.rawclient`: WebSocket clients on plain sockets, which send
  what they like and read only if asked (what a well-behaved library never does).
"""
