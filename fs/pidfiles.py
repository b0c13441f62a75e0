"""Pid files of mount daemons, one per mount point, so `unmount` can wait for the daemon to
finish. The daemon owns its file: it writes it at start and removes it when it ends."""

from __future__ import annotations

import os
import pathlib


def _runtime_dir() -> pathlib.Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or ("/run" if os.getuid() == 0 else "/tmp")
    return pathlib.Path(base) / "modelfs"


def pid_file(mountpoint: os.PathLike | str) -> pathlib.Path:
    key = os.path.abspath(mountpoint).strip("/").replace("/", "_") or "root"
    return _runtime_dir() / f"{key[-200:]}.pid"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie of ours (foreground tests) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def write_pid(mountpoint) -> None:
    path = pid_file(mountpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    _forget_dead_daemons(path.parent)
    path.write_text(f"{os.getpid()}\n")


def _forget_dead_daemons(runtime_dir: pathlib.Path) -> None:
    """Pid files of daemons that died without cleaning up (SIGKILL) would pile up."""
    for other in runtime_dir.glob("*.pid"):
        try:
            if not alive(int(other.read_text())):
                other.unlink(missing_ok=True)
        except (OSError, ValueError):
            continue
