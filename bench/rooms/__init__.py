"""Rooms: does the cost of a change follow its room, and only its room?

`python -m bench.rooms` runs four phases against counter-sync, each on a
fresh server process, with the load in separate worker processes (the same
picows-on-uvloop generator as `python -m bench`), and prints one table with
each figure, its target and a verdict (JSON in bench/results/rooms.json);
``--runs`` times over, floors included, then each target's median:

1. fan-out: many small rooms (1,000 x 10 connections), one action per second
   in every room, spread over the second. Every connection must end on its
   room's exact value; the server's CPU per delivery is compared with the
   rooms floor measured in the same run (:mod:`bench.rooms.floor`: one epoll
   loop that reads each action and writes its room's sockets), and shown
   beside floor.py's socket.send rounds; the delivery delay is reported.
   Then the same work is measured on the plainest websockets server for it
   (:mod:`bench.peers.rooms_bare`): the library's own floor.
2. cost: the server's CPU per action in one 10-user room, first alone, then
   with 10,000 other users in idle rooms, several times each.
3. memory: with --state, 10,000 room names joined and left once each; the
   server's RSS before, half-way, at its peak and after.
4. isolation: a burst of pipelined actions in one big room while a client in a
   small room acts every 50 ms and times how long it takes to see its change.

Keepalive pings are off (`--ping-interval 0`) in phases 1, 2 and 4: 10,000
connections opened over several seconds would each be pinged once, 20 s
later, at a moment that depends on how long the joins took; that cost is the
keepalive's, not a delivery's, and it would land in one condition and not the
other. Every wait has a timeout, so the bench always finishes.
"""
