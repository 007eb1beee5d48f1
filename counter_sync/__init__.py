"""counter-sync: shared counters, kept in sync across every connected browser.

Start reading at :mod:`counter_sync.counter`: the users, the value, and the
handler that serves each client. The rest of the package, by role:

* :mod:`counter_sync.fanout`: one frame to many connections, with backpressure;
* :mod:`counter_sync.admission`: origins, caps and the rate limit;
* :mod:`counter_sync.web`: the page and the health check on the same port;
* :mod:`counter_sync.hub`: the rooms of one server, and the way in;
* :mod:`counter_sync.store`: the store interface, with the in-memory store;
  :mod:`counter_sync.sqlite_store` and :mod:`counter_sync.redis_store`;
* :mod:`counter_sync.app`: start and stop a server;
* :mod:`counter_sync.cli`: the command line.
"""

__version__ = "1.1.0"
