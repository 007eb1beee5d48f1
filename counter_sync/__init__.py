"""counter-sync: shared counters, kept in sync across every connected browser.

Start reading at :mod:`counter_sync.counter`: the users, the value, and the
handler that serves each client. The rest of the package, by role:

* :mod:`counter_sync.flush`: the coalesced flush, what each room owes;
  :mod:`counter_sync.passes`: the passes that pay it, one for every room;
  :mod:`counter_sync.oplog`: a session's numbered ops on one connection;
* :mod:`counter_sync.fanout`: bytes to many connections, with backpressure;
* :mod:`counter_sync.connection`: one connection, hardened;
  :mod:`counter_sync.sweep`: keepalive and liveness, one sweep for all;
* :mod:`counter_sync.admission`: origins, caps and rate limits;
  :mod:`counter_sync.tokens`: who may read and who may change;
* :mod:`counter_sync.web`: the page, health, metrics and probes on the same port;
  :mod:`counter_sync.api`: the HTTP API for backends;
* :mod:`counter_sync.hub`: the rooms of one server, and the way in;
* :mod:`counter_sync.store`: the store interface, with the in-memory store;
  :mod:`counter_sync.sqlite_store` and :mod:`counter_sync.redis_store`;
* :mod:`counter_sync.app`: start and stop a server; :mod:`counter_sync.tasks`:
  background tasks that cannot die silently;
* :mod:`counter_sync.flags` and :mod:`counter_sync.cli`: the command line;
* :mod:`counter_sync.client`: a Python client that counts each click once.
"""

__version__ = "1.1.0"
