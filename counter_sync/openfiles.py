"""The open-files budget: every user, pending handshake and queued accept is an open file.

Checked once, at start-up, before the server listens: the caps are fitted to
the process's open-files limit here, so that no accept() ever fails for want
of a descriptor (see :func:`fit_to_open_files`).
"""

from __future__ import annotations

import dataclasses
import logging
import resource

from counter_sync.config import FD_HEADROOM, FITTED_MINIMUM, FITTED_SHARE, Settings

__all__ = ["fit_to_open_files"]

log = logging.getLogger("counter_sync.openfiles")


def fit_to_open_files(settings: Settings) -> Settings:
    """Raise the open-files limit to what the caps need, or lower what fits to it.

    Every user and every handshake in progress is an open file, and so,
    briefly, is every connection the kernel queued for accept: the event loop
    accepts a whole queue at once, refused ones included, and asyncio's own
    loop stops accepting for a second when accept() runs out of files. The
    queue (the listen backlog) holds no file until then, so it gives way
    first: it is shortened to the files left over by the users and pending
    handshakes, down to FITTED_MINIMUM; only then are the caps lowered.
    """
    needed = settings.max_users + settings.max_pending + settings.listen_backlog + FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft >= needed:
        return settings
    spare = soft - FD_HEADROOM
    left_over = spare - settings.max_users - settings.max_pending
    if left_over >= FITTED_MINIMUM:  # the caps fit: a shorter queue is enough
        fitted = dataclasses.replace(settings, listen_backlog=left_over)
        log.info(
            "open-files limit %d: listen backlog %d (of %d) beside --max-users %d and "
            "--max-pending %d",
            soft,
            left_over,
            settings.listen_backlog,
            settings.max_users,
            settings.max_pending,
        )
        return fitted
    share = max(FITTED_MINIMUM, int(spare * FITTED_SHARE))
    backlog = min(settings.listen_backlog, share)
    pending = min(settings.max_pending, share)
    users = max(1, spare - backlog - pending)
    fitted = dataclasses.replace(
        settings,
        max_users=min(settings.max_users, users),
        max_pending=pending,
        listen_backlog=backlog,
    )
    log.warning(
        "open-files limit %d is below the %d that --max-users %d, --max-pending %d and a "
        "listen backlog of %d need: serving up to %d users, %d pending handshakes, backlog %d "
        "(raise the limit: ulimit -n, or LimitNOFILE in a systemd unit)",
        soft,
        needed,
        settings.max_users,
        settings.max_pending,
        settings.listen_backlog,
        fitted.max_users,
        fitted.max_pending,
        fitted.listen_backlog,
    )
    return fitted
