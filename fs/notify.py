"""systemd's service notification protocol (sd_notify(3)) without libsystemd: one datagram of
`KEY=VALUE` lines to the unix socket named by $NOTIFY_SOCKET (`@name` is an abstract socket).
Nothing happens where the variable is unset, i.e. not under a Type=notify unit."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("modelfs.notify")


def notify(*fields: str) -> bool:
    """Send `fields` (e.g. "READY=1") to systemd; True if a datagram went out. Blocks for at
    most a second (a full socket queue): call it from a thread while the loop serves."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path.startswith(("/", "@")):
        if path:
            log.warning("NOTIFY_SOCKET=%r is not a unix socket path; not notifying", path)
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(1.0)
            sock.sendto("\n".join(fields).encode(), address)
    except OSError as exc:
        log.warning("could not notify systemd (%s): %s", path, exc)
        return False
    return True
