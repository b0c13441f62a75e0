"""Real processes for mount tests: `modelfs serve` and `modelfs mount` as users run them.

Every mount is lazily unmounted and its daemon killed in teardown, even when a test fails.
Requests are counted from the server's access log (one line per request, see fetcher.server).
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import signal
import subprocess
import time

import pytest

from modelfs.cache.chunks import MAX_CHUNK_BYTES

from .helpers import MODELFS, free_port, stop_process

_LOG_RE = re.compile(r'"(?P<method>\S+) (?P<path>\S+)" range=(?P<range>\S+) (?P<status>\S+)')

fuse_available = pytest.mark.skipif(
    not (os.path.exists("/dev/fuse") and shutil.which("fusermount3")),
    reason="needs /dev/fuse and fusermount3")


class Server:
    """`modelfs serve` on a fixed port, so it can be stopped and started again."""

    def __init__(self, models: pathlib.Path, state: pathlib.Path, log: pathlib.Path,
                 chunk_size: str = "1M", *extra: str):
        self.models, self.state, self.log, self.chunk_size = models, state, log, chunk_size
        self.extra = extra
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> "Server":
        log = open(self.log, "a")
        self.proc = subprocess.Popen(
            MODELFS + ["serve", "--models", str(self.models), "--listen",
                       f"127.0.0.1:{self.port}", "--chunk-size", self.chunk_size,
                       "--state-dir", str(self.state), *self.extra],
            stdout=subprocess.PIPE, stderr=log, text=True)
        log.close()
        line = self.proc.stdout.readline()
        assert line.startswith("serving"), f"server did not start: {line!r}"
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def requests(self) -> list[dict]:
        if not self.log.exists():
            return []
        out = []
        for line in self.log.read_text().splitlines():
            m = _LOG_RE.search(line)
            if m and "modelfs.serve" in line:
                out.append(m.groupdict())
        return out

    def ranges(self, digest: str) -> list[str]:
        return [r["range"] for r in self.requests()
                if r["method"] == "GET" and digest in r["path"] and "/blobs/" in r["path"]
                and r["range"] != "-"]


def chunk_range(index: int, chunk: int, size: int) -> str:
    start = index * chunk
    return f"bytes={start}-{min(start + chunk, size) - 1}"


# Mounts started by the current test, once each (tests/conftest.py checks their cache
# directories at its end).
started: list["Mount"] = []


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].isalpha() else int(text)


def caches_to_check() -> list[tuple[pathlib.Path, dict]]:
    """The cache directories of the mounts this test started, with check_cache_dir's options.
    A cap may be exceeded by the chunks in flight (--max-inflight, README). A daemon stopped by
    `unmount` recorded every chunk it wrote; one killed (or lazily unmounted, then killed) may
    leave what its unrecorded budget allows (--max-inflight, and one chunk alone may exceed
    it), in blobs the next daemon does not open again: each such life adds its own; and what
    a step cut short leaves (check_cache_dir's `crashed`)."""
    out: dict[pathlib.Path, dict] = {}
    for m in started:
        inflight = 64 << 20
        if "--max-inflight" in m.extra:
            inflight = _size(m.extra[m.extra.index("--max-inflight") + 1])
        for cache, clean in m.lives:
            entry = out.setdefault(cache, {"over_cap": 0, "clean": True, "leftover": 0,
                                           "crashed": False})
            entry["over_cap"] = max(entry["over_cap"], inflight)
            if not clean:
                entry["clean"] = False
                entry["crashed"] = True
                entry["leftover"] += inflight + MAX_CHUNK_BYTES
    for entry in out.values():
        if entry["clean"]:
            del entry["leftover"]
    return list(out.items())


class Mount:
    """`modelfs mount` in the background; `pid` is the daemon."""

    def __init__(self, mountpoint: pathlib.Path, cache: pathlib.Path, registry: str,
                 *extra: str):
        self.path, self.cache, self.registry, self.extra = mountpoint, cache, registry, extra
        self.pid = None
        self.lives: list[tuple[pathlib.Path, bool]] = []  # (cache, stopped by unmount) each start

    def start(self, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(MODELFS + ["mount", str(self.path), "--registry", self.registry,
                                   "--cache", str(self.cache), *self.extra], check)

    def run(self, command: list[str], check: bool = True) -> subprocess.CompletedProcess:
        """Mount by `command` (`modelfs mount`, mount(8), ...), which prints the daemon's pid."""
        self.path.mkdir(exist_ok=True)
        if self not in started:
            started.append(self)
        self.lives.append((self.cache, False))
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if check:
            assert result.returncode == 0, result.stderr
        m = re.search(r"daemon pid (\d+)", result.stdout)
        if m:
            self.pid = int(m.group(1))
        return result

    def unmount(self) -> None:
        """`modelfs unmount`, then wait until the daemon is gone."""
        subprocess.run(MODELFS + ["unmount", str(self.path)], check=True, capture_output=True)
        assert self.wait_gone()
        if self.lives:
            self.lives[-1] = (self.lives[-1][0], True)

    def alive(self) -> bool:
        if self.pid is None:
            return False
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    def wait_gone(self, timeout: float = 10) -> bool:
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.alive()

    def cleanup(self) -> None:
        subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            self.wait_gone()

    def log(self) -> str:
        path = self.cache / "mount.log"
        return path.read_text() if path.exists() else ""


def mounted(path: pathlib.Path) -> bool:
    target = str(path.resolve())
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)
