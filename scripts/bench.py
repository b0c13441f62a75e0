"""modelfs benchmark: a mount and a pull against download-then-verify, side by side.

Run it through `scripts/bench`, which sets up the .venv and installs nginx-light, curl and openssl
first. What it does:

1. Makes a model of `--size` bytes (a real GGUF from tests/gguf_factory, imported with
   `modelfs import` as bench/blob:latest) in WORKDIR/models, exports the models dir with
   `modelfs serve --export` and serves the tree with nginx on 127.0.0.1 (nginx in the
   foreground as our child; config, logs and temp files in WORKDIR/nginx).
2. Measures, `--runs` times each (each run takes the cases in a rotated order, every other
   run reversed, so no case always follows the same other one), letting the disk settle
   (`--settle`) and dropping the page cache (`sync; echo 3 > drop_caches`) before every case
   so that every byte comes from the disk at least once, then, on a VM whose balloon reports
   free pages to its host, touching and freeing memory (`--prime`, see prime_memory) so that
   every case starts from the same free memory:
     1  download-then-verify: `curl -s -o FILE URL && openssl dgst -sha256 FILE`
     2  `modelfs pull` into an empty cache
     3  cold sequential read through a fresh mount with an empty cache (`dd bs=1M`)
     4  time to the first MiB through a fresh mount with an empty cache (`dd bs=1M count=1`)
     5  warm read: the cache left full by case 3, a fresh mount (`dd bs=1M`)
     6  the blob read from the local disk (`dd bs=1M` of the models dir's blob file)
     7  peak RSS of the mount daemon during case 3 (its VmHWM read just before unmounting,
        and the largest VmRSS sampled during the read)
     8  (only with `--cases 8`) case 3 and 7 once per registry chunk size (`--chunk-sizes`,
        default 4K,64K,8M): the same blob exported with each (its own tree and nginx), read
        cold through a fresh mount with an empty cache; the time, the daemon's peak RSS, the
        range GETs nginx served (its access log), the time against the largest chunk size's
        and the RSS against the daemon's memory budget: its RSS at rest (right after
        mounting: the interpreter and its libraries) + --max-inflight + its memory cache.
        A read that runs past its limit (`--chunk-timeout`, or 10x the largest chunk size's
        time, at least 30 s) or whose daemon grows past `--chunk-rss-limit` is stopped:
        dd killed, the mount detached (`fusermount3 -u -z`), the daemon stopped by its pid.
3. Prints the median of each case in seconds and MB/s (10^6 bytes/s), then the ratios against
   the targets of issue 4 (and of case 8), and with `--json FILE` writes every raw row.

Everything it starts is stopped on the way out, also on Ctrl-C, SIGTERM or an error: mounts are
unmounted (`fusermount3 -u -z`) and their daemons killed if they linger, nginx is stopped by its
pid, and WORKDIR is deleted unless `--keep` (a kept WORKDIR's model and export are reused by the
next run of the same `--size`). WORKDIR must not be on tmpfs: the cold cases must read a disk.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import mmap
import os
import pathlib
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from modelfs.cache.chunks import MAX_CHUNK_BYTES  # noqa: E402
from modelfs.fetcher.chunksum_store import MIN_CHUNK_SIZE  # noqa: E402
from modelfs.fetcher.chunksums import MAX_CHUNKS  # noqa: E402
from modelfs.fs.sizes import format_size, size_arg  # noqa: E402
# test tooling, not product code: nginx serving an exported tree, and its access log
from tests.nginx import Nginx, NginxError, blob_gets  # noqa: E402

MiB = 1 << 20
MODEL = "bench/blob:latest"
MODEL_PATH = ("bench", "blob:latest", "model.gguf")  # below the mountpoint
MARKER = ".modelfs-bench"
CASES = {
    1: "download+verify (curl, openssl sha256)",
    2: "modelfs pull, empty cache",
    3: "cold read, fresh mount, empty cache",
    4: "first MiB, fresh mount, empty cache",
    5: "warm read, fresh mount, full cache",
    6: "local disk read of the blob",
}
# (name, numerator case, denominator case, target, how the value is shown)
RATIOS = [
    ("case3/case1", 3, 1, 1.0, "x"),
    ("case2/case1", 2, 1, 0.9, "x"),
    ("case4/case3", 4, 3, 0.02, "%"),
    ("case5/case6", 5, 6, 2.0, "x"),
]
RSS_TARGET_MIB = 256
CHUNK_CASE = 8  # off unless --cases names it (see parse_args)
CHUNK_CASE_NAME = "cold read per registry chunk size"
CHUNK_RATIO_TARGET = 1.5  # time(chunk size) / time(the largest chunk size)


class BenchError(Exception):
    pass


class Interrupted(BaseException):
    """SIGTERM/SIGHUP: unwind through the cleanup like Ctrl-C."""


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values)


# --- the machine --------------------------------------------------------------------------------


def _mounts() -> list[tuple[str, str]]:
    """(mount point, fs type) of every mount, octal escapes decoded."""
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
            out.append((point, fields[2]))
    return out


def fs_type(path: pathlib.Path) -> str:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    best, kind = "", "?"
    for point, fstype in _mounts():
        if (str(path) == point or str(path).startswith(point.rstrip("/") + "/")) \
                and len(point) >= len(best):
            best, kind = point, fstype
    return kind


def mounted_under(root: pathlib.Path) -> list[pathlib.Path]:
    root = str(root.resolve())
    return [pathlib.Path(p) for p, _ in _mounts() if p == root or p.startswith(root + "/")]


def free_bytes(path: pathlib.Path) -> int:
    while not path.exists():
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def page_reporting() -> bool:
    """Whether the guest hands free pages back to its host (virtio-balloon free page
    reporting): then a page freed some seconds ago costs a host fault when it is used again."""
    return pathlib.Path("/sys/module/page_reporting").exists()


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def prime_memory(nbytes: int) -> None:
    """Touch `nbytes` of memory and free it, right before a timed case.

    Why: where the balloon reports free pages to the host (page_reporting()), a page freed a few
    seconds ago is given back to the host, and its next use costs a host fault; a page freed
    just now is not yet. Measured here: 2 GiB written to new files in 0.5 s right after a cache
    drop, in 5.2 s ten seconds after it. Without this, each case would pay for its fresh pages
    according to what the case before it left in the page cache for the drop to free (a read of
    the local disk took 0.5 or 5.9 CPU seconds by its place in the order). Primed, every case
    starts with the same free memory, as on a machine without a balloon."""
    if nbytes <= 0:
        return
    step = 64 * MiB
    ones = b"\1" * step
    with mmap.mmap(-1, nbytes) as mem:
        for off in range(0, nbytes - step + 1, step):
            mem[off:off + step] = ones


def cpu_seconds() -> float:
    """Busy CPU time of the whole machine so far (all CPUs; /proc/stat less idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM/VmRSS of a process in KiB (empty if it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def find_tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")
    if not found:
        raise BenchError(f"{name} is not installed (scripts/bench installs it with apt-get)")
    return found


# --- the benchmark ------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    run: int
    case: int
    name: str
    seconds: float
    bytes: int
    cpu: float  # busy CPU seconds of the whole machine (a diagnostic, not a target)

    @property
    def mb_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else float("inf")


@dataclasses.dataclass
class RssRow:
    run: int
    vm_hwm_kib: int
    max_vm_rss_kib: int


@dataclasses.dataclass
class ChunkRow:
    """One cold read of case 8 at one registry chunk size."""
    run: int
    chunk_bytes: int
    chunk: str  # as shown: 4K, 64K, 8M
    seconds: float  # until dd finished, or until the read was stopped
    completed: bool
    stopped: str  # why it was stopped ("" if it completed)
    limit_s: float  # the time limit it ran under
    bytes_read: int  # by dd: the blob's size, or how far it got before it was stopped
    idle_rss_kib: int  # the daemon's VmRSS right after mounting, before the read
    vm_hwm_kib: int  # the daemon's VmHWM at the end of the read (or when it was stopped)
    max_vm_rss_kib: int  # the largest VmRSS sampled during the read
    range_gets: int  # GETs of the blob with a Range header that nginx logged
    bytes_served: int  # body bytes of those GETs
    cpu: float

    @property
    def mb_s(self) -> float:
        return self.bytes_read / 1e6 / self.seconds if self.seconds > 0 else float("inf")


def chunk_label(n: int) -> str:
    if n % MiB == 0:
        return f"{n // MiB}M"
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work: pathlib.Path = args.workdir.resolve()
        self.modelfs = self._modelfs_cmd()
        self.nginx_bin = find_tool("nginx")
        self.curl = find_tool("curl")
        self.openssl = find_tool("openssl")
        self.dd_bin = find_tool("dd")
        self.fusermount = find_tool("fusermount3")
        self.mount_args = shlex.split(args.mount_args or "")
        self.pull_args = shlex.split(args.pull_args or "")
        self.nginx: Nginx | None = None
        self.servers: list[Nginx] = []  # every nginx started, stopped by pid on the way out
        self.url = ""
        # case 8: largest chunk size first (the reference, whose time bounds the others')
        self.chunk_sizes: list[int] = sorted(set(args.chunk_sizes), reverse=True)
        self.chunk_nginx: dict[int, Nginx] = {}  # chunk size -> nginx serving its tree
        self.chunk_skipped: dict[int, str] = {}  # chunk size -> why case 8 cannot read it
        self.chunk_rows: list[ChunkRow] = []
        self.budget: tuple[int, int] = (0, 0)  # the daemon's (in-flight, memory cache) bytes
        self.rss_limit = 0
        self.daemons: dict[pathlib.Path, int | None] = {}  # mountpoint -> daemon pid
        self.rows: list[Row] = []
        self.rss: list[RssRow] = []
        self.created_work = False
        self.digest = ""
        self.blob_size = 0
        self.blob_path: pathlib.Path | None = None
        self.drop_ok = True
        self.cpu_mark = 0.0
        self.prime_bytes = 0  # set once the blob's size is known (prepare)

    @staticmethod
    def _modelfs_cmd() -> list[str]:
        exe = REPO / ".venv" / "bin" / "modelfs"
        return [str(exe)] if exe.exists() else [sys.executable, "-m", "modelfs.fs.cli"]

    # -- plumbing ------------------------------------------------------------------------------

    def run(self, cmd: list[str], timeout: float | None = None, check: bool = True,
            **kw) -> subprocess.CompletedProcess:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
        if check and result.returncode != 0:
            raise BenchError(f"{shlex.join(cmd)} failed ({result.returncode}):\n"
                             f"{(result.stderr or result.stdout).strip()[-2000:]}")
        return result

    def timeout_for(self, nbytes: int) -> float:
        return 120 + nbytes / (2 * 10**6)  # anything slower than 2 MB/s is broken, not slow

    def drop_caches(self) -> None:
        os.sync()
        # Let the disk settle: writes the guest has handed over (a pull's 2 GiB, a deleted
        # cache) may still keep the host busy, and would be charged to the next case.
        time.sleep(self.args.settle)
        if not self.args.no_drop_caches:
            try:
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("3\n")
            except OSError as exc:
                raise BenchError(f"cannot drop the page cache ({exc.strerror}): run as root, "
                                 "or pass --no-drop-caches (then the cold cases are not "
                                 "cold)") from None
        prime_memory(self.prime_bytes)
        self.cpu_mark = cpu_seconds()

    def prime_size(self) -> int:
        """--prime, or by default (`auto`, where free pages are reported to the host) what one
        case can need: the source's pages and a copy of the blob, and 2 GiB more, at most half
        of the free memory."""
        want = self.args.prime
        if want is None:
            want = 2 * self.blob_size + (2 << 30) if page_reporting() else 0
        want = min(want, mem_available() // 2)
        return want - want % (64 * MiB)

    # -- setup ---------------------------------------------------------------------------------

    def prepare_workdir(self) -> None:
        kind = fs_type(self.work)
        if kind in ("tmpfs", "ramfs") and not self.args.allow_tmpfs:
            raise BenchError(f"{self.work} is on {kind}: the cold cases must read a disk; "
                             "pass --workdir on a disk (e.g. under /var/tmp)")
        if self.work.exists():
            if any(self.work.iterdir()) and not (self.work / MARKER).exists():
                raise BenchError(f"{self.work} exists, is not empty and was not made by this "
                                 "benchmark; choose another --workdir")
            for stale in mounted_under(self.work):  # left by a run that was killed
                log(f"unmounting stale mount {stale}")
                subprocess.run([self.fusermount, "-u", "-z", str(stale)], capture_output=True)
            for child in self.work.iterdir():  # keep only a reusable model and its exports
                if child.name not in ("models", "export", "state", MARKER) \
                        and not child.name.startswith("export-"):
                    _remove(child)
        else:
            self.work.mkdir(parents=True)
        self.created_work = True
        (self.work / MARKER).write_text("made by modelfs scripts/bench; deleted when it ends\n")
        need = 4 * self.args.size + (1 << 30)
        if free_bytes(self.work) < need:
            raise BenchError(f"{self.work} has {format_size(free_bytes(self.work))} free; "
                             f"the benchmark needs about {format_size(need)}")

    def make_model(self) -> None:
        models = self.work / "models"
        stamp = models / ".bench-stamp"
        manifest = models / "manifests" / "registry.ollama.ai" / "bench" / "blob" / "latest"
        want = f"size={self.args.size} seed={self.args.seed}\n"
        if not (stamp.exists() and stamp.read_text() == want and manifest.exists()):
            for d in ("models", "export", "state"):
                _remove(self.work / d)
            for d in self.work.glob("export-*"):
                _remove(d)
            from tests.gguf_factory import make_gguf_of_size
            source = self.work / "source.gguf"
            log(f"generating a {format_size(self.args.size)} GGUF")
            t = time.monotonic()
            make_gguf_of_size(source, self.args.size, seed=self.args.seed)
            log(f"  {time.monotonic() - t:.1f}s; importing it as {MODEL}")
            self.run(self.modelfs + ["import", str(source), MODEL, "--models", str(models)],
                     timeout=self.timeout_for(3 * self.args.size))
            source.unlink()
            stamp.write_text(want)
        doc = json.loads(manifest.read_bytes())
        layer = next(x for x in doc["layers"] if x["mediaType"].endswith(".model"))
        self.digest, self.blob_size = layer["digest"], layer["size"]
        self.blob_path = models / "blobs" / self.digest.replace(":", "-")
        self.prime_bytes = self.prime_size()
        log(f"exporting {models} with `modelfs serve --export`")
        t = time.monotonic()
        out = self.run(self.modelfs + [
            "serve", "--models", str(models), "--export", str(self.work / "export"),
            "--state-dir", str(self.work / "state"), "--chunk-size", self.args.chunk_size],
            timeout=self.timeout_for(2 * self.args.size))
        log(f"  {out.stdout.strip()} ({time.monotonic() - t:.1f}s)")

    def make_chunk_exports(self) -> None:
        """Case 8: the models dir exported once per chunk size, each tree its own (a tree has
        one chunk list per blob); the blob entries are hard links to the same file."""
        for chunk in self.chunk_sizes:
            label = chunk_label(chunk)
            dest = self.work / f"export-{label}"
            t = time.monotonic()
            self.run(self.modelfs + [
                "serve", "--models", str(self.work / "models"), "--export", str(dest),
                "--state-dir", str(self.work / "state"), "--chunk-size", str(chunk)],
                timeout=self.timeout_for(2 * self.args.size))
            listing = dest / "v2" / "bench" / "blob" / "chunksums" / self.digest
            nbytes = listing.stat().st_size
            log(f"  exported with {label} chunks: a chunk list of {format_size(nbytes)} "
                f"({time.monotonic() - t:.1f}s)")
            count = -(-self.blob_size // chunk)
            if count > MAX_CHUNKS:  # the client would refuse it: not a fetcher case
                self.chunk_skipped[chunk] = (
                    f"its chunk list has {count} chunks, over the client's limit of "
                    f"{MAX_CHUNKS} (MAX_CHUNKS); use a smaller --size")
                log(f"  case 8 skips {label}: {self.chunk_skipped[chunk]}")

    def memory_budget(self) -> tuple[int, int]:
        """The daemon's memory budget as configured: (--max-inflight, memory cache) in bytes,
        from the mount's option parser given --mount-args (its defaults otherwise) and, for
        the memory cache, which is no mount option, the Materializer's default (the mount
        does not pass one)."""
        from modelfs.fetcher.materializer import Materializer
        from modelfs.fs.cli import build_parser
        try:
            opts = build_parser().parse_args(["mount", str(self.work / "mnt"),
                                              *self.mount_args])
        except SystemExit:
            raise BenchError(f"--mount-args {shlex.join(self.mount_args)!r} are not "
                             "`modelfs mount` options") from None
        memory = getattr(opts, "memory_cache", None)
        if memory is None:
            param = inspect.signature(Materializer).parameters.get("memory_cache")
            memory = param.default if param is not None else 0
        return opts.max_inflight, memory

    def start_one_nginx(self, root: pathlib.Path, work: pathlib.Path, port: int = 0) -> Nginx:
        # its own session: a Ctrl-C reaches us, and we stop nginx ourselves, by pid
        server = Nginx(self.nginx_bin, root, work, port=port)
        try:
            server.start(new_session=True)
        except NginxError as exc:
            raise BenchError(str(exc)) from None
        finally:
            self.servers.append(server)
        return server

    def start_nginx(self) -> None:
        self.nginx = self.start_one_nginx(self.work / "export", self.work / "nginx",
                                          self.args.port)
        self.url = self.nginx.url
        version = self.run([self.nginx_bin, "-v"], check=False).stderr.strip()
        log(f"{version} (pid {self.nginx.proc.pid}) serving {self.work / 'export'} on "
            f"{self.url}")
        if CHUNK_CASE in self.args.cases:
            for chunk in self.chunk_sizes:
                if chunk in self.chunk_skipped:
                    continue
                label = chunk_label(chunk)
                server = self.start_one_nginx(self.work / f"export-{label}",
                                              self.work / f"nginx-{label}")
                self.chunk_nginx[chunk] = server
                log(f"  nginx (pid {server.proc.pid}) serving the {label} export on "
                    f"{server.url}")

    # -- mounts --------------------------------------------------------------------------------

    def mount(self, mnt: pathlib.Path, cache: pathlib.Path, url: str | None = None) -> int:
        mnt.mkdir(parents=True, exist_ok=True)
        self.daemons[mnt] = None
        out = self.run(self.modelfs + ["mount", str(mnt), "--registry", url or self.url,
                                       "--cache", str(cache), *self.mount_args], timeout=120)
        m = re.search(r"daemon pid (\d+)", out.stdout)
        if not m:
            raise BenchError(f"no daemon pid in the mount's output: {out.stdout.strip()!r}")
        self.daemons[mnt] = int(m.group(1))
        return self.daemons[mnt]

    def unmount(self, mnt: pathlib.Path) -> None:
        pid = self.daemons.pop(mnt, None)
        if mnt in mounted_under(mnt):
            r = self.run(self.modelfs + ["unmount", str(mnt)], timeout=60, check=False)
            if r.returncode != 0:
                log(f"modelfs unmount {mnt} failed ({r.stderr.strip()}); detaching it")
                subprocess.run([self.fusermount, "-u", "-z", str(mnt)], capture_output=True)
        if pid is not None:
            _stop_pid(pid, grace=15)

    def detach(self, mnt: pathlib.Path) -> None:
        """Unmount a mount whose read was stopped: lazily (its reader may still hang in a FUSE
        request), then stop its daemon by pid; a clean unmount would wait for the daemon's
        backlog first."""
        pid = self.daemons.pop(mnt, None)
        subprocess.run([self.fusermount, "-u", "-z", str(mnt)], capture_output=True)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            _stop_pid(pid, grace=10)

    # -- the cases -----------------------------------------------------------------------------

    def record(self, run: int, case: int, seconds: float, nbytes: int) -> None:
        row = Row(run, case, CASES[case], seconds, nbytes, cpu_seconds() - self.cpu_mark)
        self.rows.append(row)
        log(f"  run {run} case {case} {row.name}: {seconds:.3f}s, {row.mb_s:.1f} MB/s, "
            f"{row.cpu:.1f} CPU s (whole machine, since the cache drop)")

    def dd(self, path: pathlib.Path, count: int | None = None) -> tuple[float, int]:
        cmd = [self.dd_bin, f"if={path}", "of=/dev/null", "bs=1M"]
        if count is not None:
            cmd.append(f"count={count}")
        want = self.blob_size if count is None else min(self.blob_size, count * MiB)
        t = time.monotonic()
        out = self.run(cmd, timeout=self.timeout_for(want))
        elapsed = time.monotonic() - t
        m = re.search(r"^(\d+) bytes", out.stderr, re.MULTILINE)
        got = int(m.group(1)) if m else -1
        if got != want:
            raise BenchError(f"dd read {got} bytes of {path}, expected {want}")
        return elapsed, got

    def case_download(self, run: int) -> None:
        target = self.work / "download" / "blob"
        target.parent.mkdir(exist_ok=True)
        url = f"{self.url}/v2/bench/blob/blobs/{self.digest}"
        script = (f"{shlex.quote(self.curl)} -s -f -o {shlex.quote(str(target))} "
                  f"{shlex.quote(url)} && {shlex.quote(self.openssl)} dgst -sha256 "
                  f"{shlex.quote(str(target))}")
        self.drop_caches()
        t = time.monotonic()
        out = self.run(["bash", "-c", script], timeout=self.timeout_for(self.blob_size))
        elapsed = time.monotonic() - t
        got = out.stdout.strip().rsplit(" ", 1)[-1]
        if "sha256:" + got != self.digest:
            raise BenchError(f"downloaded blob hashes to {got}, not {self.digest}")
        self.record(run, 1, elapsed, self.blob_size)
        _remove(target.parent)

    def case_pull(self, run: int) -> None:
        cache = self.work / "pull-cache"
        _remove(cache)
        self.drop_caches()
        t = time.monotonic()
        out = self.run(self.modelfs + ["pull", MODEL, "--registry", self.url, "--cache",
                                       str(cache), *self.pull_args],
                       timeout=self.timeout_for(self.blob_size))
        elapsed = time.monotonic() - t
        if "verified and sealed" not in out.stdout:
            raise BenchError(f"unexpected pull output: {out.stdout.strip()!r}")
        self.record(run, 2, elapsed, self.blob_size)
        _remove(cache)

    def case_cold_and_warm(self, run: int) -> None:
        cache, mnt = self.work / "mount-cache", self.work / "mnt"
        _remove(cache)
        # 3: cold, with the daemon's memory watched during the read
        pid = self.mount(mnt, cache)
        self.drop_caches()
        sampler = _RssSampler(pid)
        sampler.start()
        try:
            elapsed, nbytes = self.dd(mnt.joinpath(*MODEL_PATH))
        finally:
            sampler.stop()
        hwm = proc_status(pid).get("VmHWM", 0)  # just before unmounting: the whole life
        self.record(run, 3, elapsed, nbytes)
        self.rss.append(RssRow(run, hwm, sampler.max_rss))
        log(f"  run {run} case 7 peak RSS of the daemon: VmHWM {hwm / 1024:.1f} MiB, "
            f"largest sampled VmRSS {sampler.max_rss / 1024:.1f} MiB")
        self.unmount(mnt)
        # 5: warm, the cache case 3 filled, a fresh mount
        self.mount(mnt, cache)
        self.drop_caches()
        elapsed, nbytes = self.dd(mnt.joinpath(*MODEL_PATH))
        self.record(run, 5, elapsed, nbytes)
        self.unmount(mnt)
        _remove(cache)

    def case_first_mib(self, run: int) -> None:
        cache, mnt = self.work / "mount-cache", self.work / "mnt"
        _remove(cache)
        self.mount(mnt, cache)
        self.drop_caches()
        elapsed, nbytes = self.dd(mnt.joinpath(*MODEL_PATH), count=1)
        self.record(run, 4, elapsed, nbytes)
        self.unmount(mnt)
        _remove(cache)

    def case_local(self, run: int) -> None:
        self.drop_caches()
        elapsed, nbytes = self.dd(self.blob_path)
        self.record(run, 6, elapsed, nbytes)

    def case_chunk_sizes(self, run: int) -> None:
        sizes = [c for c in self.chunk_sizes if c not in self.chunk_skipped]
        if not sizes:
            return
        k = (run - 1) % len(sizes)  # rotated like the cases (run 1: the largest first)
        order = sizes[k:] + sizes[:k]
        if run % 2 == 0:
            order.reverse()
        for chunk in order:
            self.chunk_read(run, chunk)

    def chunk_limit(self) -> float:
        """How long one read of case 8 may take: --chunk-timeout, or less once the largest
        chunk size has a time: 10x that, at least 30 s (a read that slow misses its 1.5x
        target by far; how far does not need the rest of the read)."""
        ref = [r.seconds for r in self.chunk_rows
               if r.chunk_bytes == self.chunk_sizes[0] and r.completed]
        if not ref:
            return self.args.chunk_timeout
        return min(self.args.chunk_timeout, max(10 * median(ref), 30.0))

    def chunk_read(self, run: int, chunk: int) -> None:
        label, server = chunk_label(chunk), self.chunk_nginx[chunk]
        cache, mnt = self.work / "chunk-cache", self.work / "mnt"
        _remove(cache)
        pid = self.mount(mnt, cache, server.url)
        idle = proc_status(pid).get("VmRSS", 0)
        mark = server.log_size()  # the access log from here on is this read's
        limit = self.chunk_limit()
        self.drop_caches()
        sampler = _RssSampler(pid, limit_kib=self.rss_limit // 1024)
        sampler.start()
        cmd = [self.dd_bin, f"if={mnt.joinpath(*MODEL_PATH)}", "of=/dev/null", "bs=1M"]
        t = time.monotonic()
        dd = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        stopped, got = "", -1
        try:
            while dd.poll() is None:
                if sampler.over.wait(0.05):
                    stopped = f"daemon RSS over {format_size(self.rss_limit)}"
                elif time.monotonic() - t > limit:
                    stopped = f"over the {limit:.0f} s limit"
                if stopped:
                    got = _fd_pos(dd.pid, 0)  # dd reads its input as fd 0
                    break
            elapsed = time.monotonic() - t
            hwm = proc_status(pid).get("VmHWM", 0)  # before the daemon goes: its whole life
        finally:
            sampler.stop()
            if dd.poll() is None:
                dd.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    dd.wait(timeout=10)  # else it waits in a FUSE request: detach() ends it
        cpu = cpu_seconds() - self.cpu_mark
        if stopped:
            self.detach(mnt)
            with contextlib.suppress(subprocess.TimeoutExpired):
                dd.wait(timeout=30)
            if dd.poll() is None:
                log(f"  dd (pid {dd.pid}) is still in a read of the detached mount")
        else:
            err = dd.stderr.read()
            m = re.search(r"^(\d+) bytes", err, re.MULTILINE)
            got = int(m.group(1)) if m else -1
            if dd.returncode != 0 or got != self.blob_size:
                tail = _tail(cache / "mount.log", 5)
                self.unmount(mnt)
                raise BenchError(f"case 8, {label} chunks: dd failed ({dd.returncode}, read "
                                 f"{got} of {self.blob_size} bytes): {err.strip()[-500:]}"
                                 f"\nmount.log ends:\n{tail}")
            self.unmount(mnt)
        # after the unmount: the GETs still in flight at the end are logged too
        requests = server.requests(mark)
        gets = blob_gets(requests, self.digest)
        row = ChunkRow(run, chunk, label, elapsed, not stopped, stopped, limit, got, idle, hwm,
                       sampler.max_rss, len(gets), sum(int(r["bytes"]) for r in gets), cpu)
        self.chunk_rows.append(row)
        done = (f"{elapsed:.3f}s, {row.mb_s:.1f} MB/s" if row.completed else
                f"STOPPED after {elapsed:.1f}s ({stopped}), "
                f"{format_size(max(got, 0))} of {format_size(self.blob_size)} read")
        log(f"  run {run} case 8 {label} chunks: {done}, VmHWM {hwm / 1024:.1f} MiB "
            f"(sampled {sampler.max_rss / 1024:.1f}, idle {idle / 1024:.1f}), "
            f"{row.range_gets} range GETs, {row.bytes_served / 1e6:.1f} MB served, "
            f"{cpu:.1f} CPU s")
        _remove(cache)

    # -- the whole thing -----------------------------------------------------------------------

    def main(self) -> None:
        self.prepare_workdir()
        self.make_model()
        if CHUNK_CASE in self.args.cases:
            self.budget = self.memory_budget()
            # the guard against a daemon that would take the machine's memory (4 KiB chunks
            # took 12.9 GB in 120 s): a quarter of what is free, at most 4 GiB, unless given
            self.rss_limit = self.args.chunk_rss_limit or min(4 << 30, mem_available() // 4)
            self.make_chunk_exports()
        self.start_nginx()
        # Each run takes the cases in another order (rotated, and every other run reversed),
        # so that no case always comes right after the same other one: a pull leaves 2 GiB
        # just written behind it, and on a VM the host may still be busy with them when the
        # next case starts (see also --settle).
        cases = [self.case_download, self.case_pull, self.case_cold_and_warm,
                 self.case_first_mib, self.case_local, self.case_chunk_sizes]
        cases = [c for c in cases if CASE_GROUPS[c.__name__] & self.args.cases]
        for run in range(1, self.args.runs + 1):
            k = (run - 1) % len(cases)
            order = cases[k:] + cases[:k]
            if run % 2 == 0:
                order.reverse()
            log(f"run {run} of {self.args.runs}: "
                f"{', '.join(c.__name__.removeprefix('case_') for c in order)}")
            for case in order:
                case(run)
        self.report()

    def report(self) -> None:
        by_case = {c: [r for r in self.rows if r.case == c] for c in CASES}
        med = {c: median([r.seconds for r in rows]) for c, rows in by_case.items() if rows}
        a = self.args
        print()
        print(f"modelfs bench: {MODEL}, {format_size(self.blob_size)} ({self.blob_size} bytes), "
              f"median of {a.runs} run(s), export chunk size {a.chunk_size}")
        print(f"  registry: nginx on {self.url}; work dir {self.work} ({fs_type(self.work)})")
        if self.mount_args or self.pull_args:
            print(f"  mount args: {shlex.join(self.mount_args) or '-'}; "
                  f"pull args: {shlex.join(self.pull_args) or '-'}")
        if a.no_drop_caches:
            print("  WARNING: page cache NOT dropped (--no-drop-caches): cold cases are warm")
        if self.prime_bytes:
            print(f"  {format_size(self.prime_bytes)} of memory touched and freed before each "
                  f"case (--prime; the balloon reports free pages to the host)")
        elif page_reporting():
            print("  memory NOT primed (--prime 0): each case's fresh pages cost what the case "
                  "before it left behind")
        if self.rows or self.rss:
            print()
            print(f"  {'case':<44} {'seconds':>9} {'MB/s':>9} {'CPU s':>6}   runs (s)")
        for c, rows in by_case.items():
            if not rows:
                continue
            mb_s = rows[0].bytes / 1e6 / med[c] if med[c] > 0 else float("inf")
            runs = " ".join(f"{r.seconds:.3f}" for r in rows)
            cpu = median([r.cpu for r in rows])
            print(f"  {c} {CASES[c]:<42} {med[c]:>9.3f} {mb_s:>9.1f} {cpu:>6.1f}   {runs}")
        hwm = median([r.vm_hwm_kib for r in self.rss]) / 1024 if self.rss else None
        if hwm is not None:
            sampled = max(r.max_vm_rss_kib for r in self.rss) / 1024
            print(f"  7 {'peak RSS of the mount daemon in case 3':<42} {hwm:>9.1f} MiB"
                  f"   (VmHWM; largest sampled VmRSS {sampled:.1f} MiB)")
        chunk_summary = self.chunk_summary()
        if CHUNK_CASE in a.cases:
            self.report_chunk_sizes(chunk_summary)
        print()
        print(f"  {'ratio':<14} {'value':>9} {'target':>10}")
        ratios = {}
        for name, num, den, target, how in RATIOS:
            if num not in med or den not in med:
                continue
            value = med[num] / med[den] if med[den] > 0 else float("inf")
            ratios[name] = value
            shown = f"{value * 100:.2f} %" if how == "%" else f"{value:.2f}"
            goal = f"<= {target * 100:g} %" if how == "%" else f"<= {target:.1f}"
            print(f"  {name:<14} {shown:>9} {goal:>10}   {'ok' if value <= target else 'MISS'}")
        if hwm is not None:
            goal = f"<= {RSS_TARGET_MIB}"
            print(f"  {'peak RSS MiB':<14} {hwm:>9.1f} {goal:>10}   "
                  f"{'ok' if hwm <= RSS_TARGET_MIB else 'MISS'}")
        self.report_chunk_ratios(chunk_summary)
        if a.json:
            doc = {
                "model": MODEL, "digest": self.digest, "blob_bytes": self.blob_size,
                "runs": a.runs, "export_chunk_size": a.chunk_size, "registry": self.url,
                "mount_args": self.mount_args, "pull_args": self.pull_args,
                "page_cache_dropped": not a.no_drop_caches, "primed_bytes": self.prime_bytes,
                "rows": [dict(dataclasses.asdict(r), mb_s=r.mb_s) for r in self.rows],
                "rss": [dataclasses.asdict(r) for r in self.rss],
                "median_seconds": {str(c): v for c, v in med.items()},
                "ratios": ratios, "peak_rss_mib": hwm,
            }
            if CHUNK_CASE in a.cases:
                doc["chunk_sizes"] = {
                    "memory_budget_bytes": sum(self.budget),
                    "max_inflight_bytes": self.budget[0], "memory_cache_bytes": self.budget[1],
                    "rss_limit_bytes": self.rss_limit, "timeout_s": a.chunk_timeout,
                    "skipped": {chunk_label(c): why for c, why in self.chunk_skipped.items()},
                    "summary": [{k: v for k, v in item.items() if k != "rows"}
                                for item in chunk_summary],
                    "rows": [dict(dataclasses.asdict(r), mb_s=r.mb_s) for r in self.chunk_rows],
                }
            a.json.write_text(json.dumps(doc, indent=2) + "\n")
            print(f"\n  raw rows written to {a.json}")

    def chunk_summary(self) -> list[dict]:
        """Case 8 per chunk size, largest first: the median time and VmHWM when every run
        completed; when one was stopped, bounds instead (the time at least the shortest stop,
        the VmHWM at least the largest seen), marked `stopped`."""
        out = []
        for chunk in self.chunk_sizes:
            rows = [r for r in self.chunk_rows if r.chunk_bytes == chunk]
            if not rows:
                continue
            stopped = [r for r in rows if not r.completed]
            if stopped:
                seconds = min(r.seconds for r in stopped)
                hwm = max(r.vm_hwm_kib for r in rows) / 1024
            else:
                seconds = median([r.seconds for r in rows])
                hwm = median([r.vm_hwm_kib for r in rows]) / 1024
            out.append({
                "chunk": chunk_label(chunk), "chunk_bytes": chunk, "rows": rows,
                "stopped": bool(stopped), "why": stopped[0].stopped if stopped else "",
                "seconds": seconds, "vm_hwm_mib": hwm,
                "idle_rss_mib": median([r.idle_rss_kib for r in rows]) / 1024,
                "max_sampled_rss_mib": max(r.max_vm_rss_kib for r in rows) / 1024,
                "range_gets": median([r.range_gets for r in rows]),
                "mb_served": median([r.bytes_served for r in rows]) / 1e6,
                "cpu": median([r.cpu for r in rows]),
            })
        ref = out[0] if out and out[0]["chunk_bytes"] == self.chunk_sizes[0] else None
        for item in out:
            item["ratio"] = (None if ref is None or ref["stopped"] or ref["seconds"] <= 0
                             else item["seconds"] / ref["seconds"])
        return out

    def report_chunk_sizes(self, summary: list[dict]) -> None:
        inflight, memory = self.budget
        print()
        print(f"  {CHUNK_CASE} {CHUNK_CASE_NAME} (fresh mount, empty cache; one nginx per "
              f"chunk size)")
        print(f"    the daemon's memory budget: its RSS at rest (idle MiB) + "
              f"{sum(self.budget) / MiB:.1f} MiB = --max-inflight {inflight / MiB:.1f} MiB + "
              f"memory cache {memory / MiB:.1f} MiB; "
              f"a read is stopped past {format_size(self.rss_limit)} of RSS or its time limit "
              f"(--chunk-timeout {self.args.chunk_timeout:g} s, or 10x the "
              f"{chunk_label(self.chunk_sizes[0])} time, at least 30 s)")
        print(f"    {'chunk':<6} {'seconds':>10} {'MB/s':>8} {'CPU s':>6} {'VmHWM MiB':>10} "
              f"{'idle MiB':>9} {'range GETs':>11} {'MB served':>10}   runs (s)")
        for item in summary:
            rows = item["rows"]
            secs = (f"> {item['seconds']:.3f}" if item["stopped"] else f"{item['seconds']:.3f}")
            mb_s = self.blob_size / 1e6 / item["seconds"] if item["seconds"] > 0 else 0.0
            speed = f"< {mb_s:.1f}" if item["stopped"] else f"{mb_s:.1f}"
            hwm = (f">= {item['vm_hwm_mib']:.1f}" if item["stopped"]
                   else f"{item['vm_hwm_mib']:.1f}")
            runs = " ".join(f"{r.seconds:.3f}" if r.completed else
                            f"stopped@{r.seconds:.1f}({r.stopped}; read "
                            f"{max(r.bytes_read, 0) / 1e6:.0f} MB)" for r in rows)
            print(f"    {item['chunk']:<6} {secs:>10} {speed:>8} {item['cpu']:>6.1f} {hwm:>10} "
                  f"{item['idle_rss_mib']:>9.1f} {item['range_gets']:>11.0f} "
                  f"{item['mb_served']:>10.1f}   {runs}")
        for chunk, why in self.chunk_skipped.items():
            print(f"    {chunk_label(chunk):<6} skipped: {why}")

    def report_chunk_ratios(self, summary: list[dict]) -> None:
        if not summary:
            return
        budget_mib = sum(self.budget) / MiB
        ref = chunk_label(self.chunk_sizes[0])
        for item in summary[1:] if summary[0]["chunk"] == ref else summary:
            name = f"case8 {item['chunk']}/{ref}"
            goal = f"<= {CHUNK_RATIO_TARGET:.1f}"
            if item["ratio"] is None:
                print(f"  {name:<14} {'n/a':>9} {goal:>10}   MISS ({ref} has no time)")
                continue
            shown = ("> " if item["stopped"] else "") + f"{item['ratio']:.2f}"
            verdict = ("MISS (stopped)" if item["stopped"] else
                       "ok" if item["ratio"] <= CHUNK_RATIO_TARGET else "MISS")
            print(f"  {name:<14} {shown:>9} {goal:>10}   {verdict}")
        for item in summary:
            name = f"RSS MiB {item['chunk']}"
            limit = item["idle_rss_mib"] + budget_mib  # (at rest: what no option changes)
            goal = f"<= {limit:.1f}"
            over = item["vm_hwm_mib"] > limit
            # a stopped read within the budget so far has not shown that it stays there
            verdict = ("MISS" if over else "stopped" if item["stopped"] else "ok") \
                + (" (stopped)" if item["stopped"] and over else "")
            shown = (">=" if item["stopped"] else "") + f"{item['vm_hwm_mib']:.1f}"
            print(f"  {name:<14} {shown:>9} {goal:>10}   {verdict}")

    def cleanup(self) -> None:
        for mnt in list(self.daemons):
            try:
                self.unmount(mnt)
            except Exception as exc:  # keep cleaning up
                log(f"cleanup: {mnt}: {exc}")
                subprocess.run([self.fusermount, "-u", "-z", str(mnt)], capture_output=True)
        if self.created_work:
            for stale in mounted_under(self.work):
                subprocess.run([self.fusermount, "-u", "-z", str(stale)], capture_output=True)
        for server in self.servers:
            server.stop()
        if self.created_work:
            if self.args.keep:
                log(f"kept {self.work}")
            elif mounted_under(self.work):
                log(f"not deleting {self.work}: something is still mounted below it")
            else:
                _remove(self.work)


class _RssSampler:
    """The largest VmRSS of a process, sampled every 50 ms in a thread; `over` is set once it
    passes `limit_kib` (if given)."""

    def __init__(self, pid: int, limit_kib: int = 0):
        self.pid, self.max_rss, self.limit_kib = pid, 0, limit_kib
        self.over = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        self.max_rss = max(self.max_rss, proc_status(self.pid).get("VmRSS", 0))
        if self.limit_kib and self.max_rss > self.limit_kib:
            self.over.set()

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            self._sample()


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        if mounted_under(path):
            raise BenchError(f"refusing to delete {path}: something is mounted below it")
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fd_pos(pid: int, fd: int) -> int:
    """The file offset of a process's fd (-1 if it cannot be read)."""
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("pos:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return -1


def _tail(path: pathlib.Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(none)"


def _stop_pid(pid: int, grace: float) -> None:
    deadline = time.monotonic() + grace
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(pid):
        log(f"daemon {pid} still running after unmount; killing it")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)


# which of the numbered cases each case method measures
CASE_GROUPS = {"case_download": {1}, "case_pull": {2}, "case_cold_and_warm": {3, 5, 7},
               "case_first_mib": {4}, "case_local": {6}, "case_chunk_sizes": {CHUNK_CASE}}


def _prime_arg(text: str) -> int | None:
    if text == "auto":
        return None
    return 0 if text.strip() == "0" else size_arg(text)


def _case_list(text: str) -> set[int]:
    try:
        cases = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of case numbers: {text!r}") from None
    if not cases or not cases <= set(CASES) | {7, CHUNK_CASE}:
        raise argparse.ArgumentTypeError(f"cases are numbered 1 to {CHUNK_CASE}, not {text!r}")
    return cases


def _chunk_sizes(text: str) -> list[int]:
    try:
        sizes = [size_arg(part.strip()) for part in text.split(",") if part.strip()]
    except (argparse.ArgumentTypeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a list of sizes: {text!r}") from None
    if not sizes:
        raise argparse.ArgumentTypeError("no chunk sizes given")
    for n in sizes:  # what `modelfs serve --export` accepts
        if not MIN_CHUNK_SIZE <= n <= MAX_CHUNK_BYTES:
            raise argparse.ArgumentTypeError(
                f"chunk sizes must be between {chunk_label(MIN_CHUNK_SIZE)} and "
                f"{chunk_label(MAX_CHUNK_BYTES)}, not {chunk_label(n)}")
    return sizes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/bench", description="Benchmark modelfs (pull, cold/warm mount reads, "
        "first MiB, daemon RSS) against curl+openssl, served by nginx from an exported tree.")
    p.add_argument("--size", type=size_arg, default=2 << 30, metavar="SIZE",
                   help="model size, e.g. 512M or 2G (default 2G)")
    p.add_argument("--runs", type=int, default=3, help="runs per case; medians are printed "
                   "(default 3)")
    p.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/var/tmp/modelfs-bench"),
                   help="work directory on a disk, not tmpfs (default /var/tmp/modelfs-bench)")
    p.add_argument("--keep", action="store_true",
                   help="keep the work directory (its model and export are reused next time)")
    p.add_argument("--json", type=pathlib.Path, metavar="FILE", help="write the raw rows here")
    p.add_argument("--mount-args", default="", metavar="ARGS",
                   help='extra `modelfs mount` options, e.g. "--max-fetches 16"')
    p.add_argument("--pull-args", default="", metavar="ARGS",
                   help='extra `modelfs pull` options, e.g. "--concurrency 16"')
    p.add_argument("--chunk-size", default="8M", metavar="SIZE",
                   help="chunk size of the exported chunk lists (default 8M)")
    p.add_argument("--port", type=int, default=0, help="nginx port (default: a free one)")
    p.add_argument("--settle", type=float, default=3.0, metavar="S",
                   help="seconds to let the disk settle before each case (default 3)")
    p.add_argument("--prime", type=_prime_arg, default=None, metavar="SIZE",
                   help="memory to touch and free right before each case (default auto: "
                   "twice the blob and 2G where the VM's balloon reports free pages to the "
                   "host, else 0; see prime_memory)")
    p.add_argument("--cases", type=_case_list, default=set(CASES), metavar="N,N",
                   help="run only these cases, e.g. 1,3 (3, 5 and 7 always run together; "
                   f"default 1 to 7; case {CHUNK_CASE}, the cold read per --chunk-sizes, runs "
                   "only when named)")
    p.add_argument("--chunk-sizes", type=_chunk_sizes, default=_chunk_sizes("4K,64K,8M"),
                   metavar="SIZE,SIZE", help=f"case {CHUNK_CASE}: the registry chunk sizes to "
                   "export the blob with and read it cold in; times are compared with the "
                   "largest's (default 4K,64K,8M)")
    p.add_argument("--chunk-timeout", type=float, default=120.0, metavar="S",
                   help=f"case {CHUNK_CASE}: a read still running after this long (or after "
                   "10x the largest chunk size's time, at least 30 s) is stopped and reported "
                   "as such (default 120)")
    p.add_argument("--chunk-rss-limit", type=size_arg, default=None, metavar="SIZE",
                   help=f"case {CHUNK_CASE}: a read whose daemon's RSS passes this is stopped "
                   "(default a quarter of the available memory, at most 4G)")
    p.add_argument("--seed", type=int, default=7, help=argparse.SUPPRESS)
    p.add_argument("--no-drop-caches", action="store_true",
                   help="do not drop the page cache (for non-root runs; cold cases are then warm)")
    p.add_argument("--allow-tmpfs", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    if args.size < 2 * MiB:
        p.error("--size must be at least 2M")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def interrupted(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    bench = None
    try:
        bench = Bench(args)
        bench.main()
        return 0
    except BenchError as exc:
        log(f"error: {exc}")
        return 1
    except subprocess.TimeoutExpired as exc:
        log(f"error: timed out: {shlex.join(exc.cmd) if isinstance(exc.cmd, list) else exc.cmd}")
        return 1
    except (KeyboardInterrupt, Interrupted) as exc:
        log(f"interrupted ({str(exc) or 'SIGINT'}); cleaning up")
        return 130
    finally:
        if bench is not None:
            # a second Ctrl-C must not leave mounts and nginx behind
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            bench.cleanup()


if __name__ == "__main__":
    sys.exit(main())
