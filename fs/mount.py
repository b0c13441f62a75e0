"""Mount lifecycle: stale-mount repair, the trio/pyfuse3 main loop, background mode, signals,
unmount.

Ownership: `serve_mount` owns one nursery for the whole mount. The materializer's fetches and
the signal watcher run in it; when pyfuse3's loop ends (unmount, SIGINT/SIGTERM) the nursery is
cancelled, the registry client and the cache are closed, and the kernel mount is released.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import pathlib
import signal
import subprocess
import time

import pyfuse3
import trio

from modelfs.cache.blobcache import BlobCache
from modelfs.cache.errors import ModelfsError
from modelfs.cache.readers import ReaderActivity
from modelfs.cache.units import FETCH_UNIT
from modelfs.fetcher.client import ClientConfig, RegistryClient
from modelfs.fetcher.engine import FetchEngine
from modelfs.fetcher.groups import first_error
from modelfs.fetcher.materializer import Materializer
from modelfs.fetcher.names import Registry, parse_name
from modelfs.fetcher.prefetch import PrefetchConfig
from modelfs.fetcher.resolver import ModelResolver

from .notify import notify
from .ops import ModelOps
from .pagecache import KernelPageCache
from .pidfiles import alive, pid_file, write_pid
from .status import MountStatus, serve_status
from .tree import Tree

log = logging.getLogger("modelfs.mount")


class MountError(ModelfsError):
    pass


@dataclasses.dataclass
class MountOptions:
    mountpoint: pathlib.Path
    cache: pathlib.Path
    registry: Registry
    models: list[str] = dataclasses.field(default_factory=list)
    read_timeout: float = 60.0
    allow_other: bool = False
    max_fetches: int = 4
    max_inflight: int = 64 << 20
    prefetch: str = "auto"
    readahead: int = 4 << 20
    cache_max: int | None = None
    min_free: int | None = None
    fetch_unit: int = FETCH_UNIT
    metrics: tuple[str, int] | None = None  # (host, port) of a metrics page
    source: str | None = None  # the registry as given (--registry, the mount helper's SOURCE)


# -- the kernel's view of mounts ------------------------------------------------------------

def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n") \
        .replace("\\134", "\\")


def mount_type(path: os.PathLike | str) -> str | None:
    """The filesystem type mounted exactly at `path` (e.g. 'fuse.modelfs'), or None."""
    target = os.path.abspath(path)
    found = None
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and _unescape(fields[1]) == target:
                found = fields[2]
    return found


def is_stale(path: os.PathLike | str) -> bool:
    # statfs always reaches the daemon; stat may be answered from the kernel's attribute cache
    try:
        os.statvfs(path)
    except OSError as exc:
        # ENOTCONN once the daemon is gone; ECONNABORTED for a request caught by the abort;
        # any other failure of a FUSE mount's statfs means it is broken just the same
        if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            return True
        return (mount_type(path) or "").startswith("fuse")
    return False


def fusermount_unmount(path: os.PathLike | str, lazy: bool = False) -> None:
    args = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [str(path)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        message = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
        raise MountError(f"cannot unmount {path}: {message}")


def mount_device(path: os.PathLike | str) -> str | None:
    """`major:minor` of the mount at `path`, read from mountinfo (not by stat: a stat of our
    own mount before the loop serves would wait for ourselves)."""
    target = os.path.abspath(path)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and _unescape(fields[4]) == target:
                found = fields[2]
    return found


async def tune_readahead(path: os.PathLike | str, size: int) -> None:
    """Raise the kernel's readahead for this mount (root only). The kernel lets a FUSE daemon
    only lower it at init (default 128 KiB); with a larger window, sequential reads and
    MAP_POPULATE arrive as 1 MiB READs several at a time instead of 128 KiB ones one by one,
    which is what a Python daemon needs to keep up (about 3x on a warm read here).

    The INIT exchange, which resets the value, happens once the loop serves; so this runs as
    a task that sets the knob shortly after and checks it again a little later."""
    knob = pathlib.Path(f"/sys/class/bdi/{mount_device(path)}/read_ahead_kb")
    want = str(max(size >> 10, 4))
    for delay in (0.05, 0.25, 1.0, 3.0):
        await trio.sleep(delay)
        try:
            if knob.read_text().strip() != want:
                knob.write_text(want)
        except Exception as exc:
            log.info("could not set readahead of %s (%s): %s", path, knob, exc)
            return


def prepare_mountpoint(path: pathlib.Path) -> None:
    """Clear a stale mount left by a dead daemon; refuse a live one."""
    if is_stale(path):
        log.warning("%s: stale mount of a dead daemon (its statfs fails); clearing it", path)
        fusermount_unmount(path, lazy=True)
    if mount_type(path) is not None:
        raise MountError(f"{path} is already a mount point ({mount_type(path)}); "
                         f"run `modelfs unmount {path}` first")
    if not path.is_dir():
        raise MountError(f"mount point {path} is not a directory")


# -- unmount ----------------------------------------------------------------------------------

def unmount(mountpoint: pathlib.Path, *, lazy: bool = False, wait: float = 45.0) -> None:
    stale = is_stale(mountpoint)
    if not stale and mount_type(mountpoint) is None:
        raise MountError(f"{mountpoint} is not mounted")
    fusermount_unmount(mountpoint, lazy=lazy or stale)
    path = pid_file(mountpoint)
    try:
        pid = int(path.read_text())
    except (OSError, ValueError):
        return
    deadline = time.monotonic() + wait
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


# -- the mount itself -------------------------------------------------------------------------

def fuse_options(opts: MountOptions) -> set[str]:
    """libfuse's defaults plus our names and read-only. Deliberately no `max_read`: READs
    already come at the kernel's ceiling of 1 MiB. The readahead window (tune_readahead) is
    what makes large sequential reads fast; max_background keeps the kernel's 12 (README)."""
    options = set(pyfuse3.default_options)
    # the source as the user gave it (an fstab line's first field): mount(8) and systemd find
    # an fstab entry mounted by it (`mount -a` skips it instead of mounting it again)
    fsname = (opts.source or "modelfs").replace("\\", "\\\\").replace(",", "\\,")
    options |= {f"fsname={fsname}", "subtype=modelfs", "ro"}
    if opts.allow_other:
        options.add("allow_other")
    return options


async def _flush_recency(cache: BlobCache) -> None:
    """Now and then: write the chunks' last-use times to the index (LRU across restarts) and
    recount the bytes on disk (the running count only approximates between recounts)."""
    while True:
        await trio.sleep(5)
        try:
            cache.budget.flush()
            await cache.budget.resync()
        except Exception as exc:  # a full disk or a busy index must not end the mount
            log.warning("updating the cache index failed: %s", exc)


async def _quietly(fn, *args) -> None:
    """Background work whose failure is logged, not fatal to the mount."""
    try:
        await fn(*args)
    except Exception as exc:
        log.warning("%s failed: %s", getattr(fn, "__name__", fn), exc)


async def _watch_signals(state: dict, task_status=trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            log.info("got %s; unmounting", signal.Signals(signum).name)
            state["signalled"] = True
            pyfuse3.terminate()
            return


async def _announce_when_answering(mountpoint: pathlib.Path, ready) -> None:
    """Tell whoever waits (the parent of a background daemon, hence mount(8); systemd) once the
    mount answers, not merely exists: the kernel holds requests to a new FUSE mount until the
    loop has answered its INIT, so a statfs from a thread returns only once pyfuse3 serves."""
    try:
        await trio.to_thread.run_sync(os.statvfs, mountpoint, abandon_on_cancel=True)
    except OSError as exc:
        raise MountError(f"the new mount at {mountpoint} does not answer: {exc}") from None
    ready(None)
    await trio.to_thread.run_sync(notify, "READY=1", f"STATUS=serving {mountpoint}")


async def serve_mount(opts: MountOptions, ready) -> None:
    """Mount, call `ready(None)` once the mount answers, serve until unmounted."""
    # readers first: sealing waits for them and hashes at low priority (cache/lowprio.py)
    # --max-inflight bounds what a crash costs too: chunks verified and not yet recorded
    cache = BlobCache(opts.cache, cap=opts.cache_max, min_free=opts.min_free,
                      readers=ReaderActivity(), max_unrecorded=opts.max_inflight)
    state = {"mounted": False}
    try:
        # a unit's bytes are held whole while in flight: never more than a fetch's share of
        # the in-flight budget (invariant 8), whatever --fetch-unit says
        unit = min(opts.fetch_unit, opts.max_inflight // max(1, opts.max_fetches))
        async with RegistryClient(ClientConfig.from_env(fetch_unit=unit)) as client:
            with first_error():
                async with trio.open_nursery() as nursery:
                    await _serve(opts, cache, client, nursery, ready, state)
    finally:
        if "close" in state:
            state["close"]()
        if state["mounted"]:
            pyfuse3.close(unmount=True)
            log.info("unmounted %s", opts.mountpoint)
        cache.close()


async def _serve(opts, cache, client, nursery, ready, state) -> None:
    resolver = ModelResolver(client, cache)
    tree = Tree(opts.registry, time.time_ns())
    for text in opts.models:
        name = parse_name(text, opts.registry)
        tree.add_model(name, await resolver.resolve(name), time.time_ns())
    # the models the cache holds are listed too (a remount shows what was read before)
    for name, manifest in resolver.load_cached(opts.registry).items():
        tree.add_model(name, manifest, time.time_ns())

    async def complete(name, manifest) -> None:
        # Only blobs/ shows the config blob; fetch it (it is small) once the rest is in, so
        # the cache holds a complete Ollama model and the manifest can be promoted.
        if manifest.config is not None:
            await materializer.read(name, manifest.config, 0, manifest.config.size)
        await resolver.promote_if_complete(name)

    def on_sealed(digest: str) -> None:
        for name, manifest in resolver.known().items():
            layers = [b for b in manifest.blobs() if b is not manifest.config]
            if any(b.digest == digest for b in manifest.blobs()) and all(
                    cache.is_sealed(b.digest, b.size) for b in layers):
                nursery.start_soon(_quietly, complete, name, manifest)

    engine = FetchEngine(cache, nursery, retry=client.config.retry, workers=opts.max_fetches,
                         max_inflight=opts.max_inflight)
    page_cache = KernelPageCache(tree)
    materializer = Materializer(client, cache, nursery, engine=engine,
                                background=opts.prefetch == "auto", on_sealed=on_sealed,
                                publish=page_cache.store)
    config = PrefetchConfig()
    if opts.cache_max is not None:  # a window larger than a quarter of the cap would thrash
        quarter = max(opts.cache_max // 4, 1 << 20)
        config = PrefetchConfig(initial_window=min(config.initial_window, quarter),
                                max_window=min(config.max_window, quarter))
    ops = ModelOps(tree, resolver, materializer, cache_root=cache.root,
                   read_timeout=opts.read_timeout, prefetch=opts.prefetch,
                   prefetch_config=config)
    nursery.start_soon(_flush_recency, cache)
    status = MountStatus(mountpoint=opts.mountpoint, resolver=resolver, cache=cache,
                         engine=engine, readers=cache.readers, page_cache=page_cache)
    await nursery.start(serve_status, cache.root, status)
    if opts.metrics is not None:
        # (imported only then: prometheus-client and hypercorn cost a mount without
        # --metrics memory and start-up time for nothing)
        from modelfs.fetcher.metrics import MountCollector, serve_metrics
        await nursery.start(serve_metrics, opts.metrics, MountCollector(status))
    await nursery.start(_watch_signals, state)
    pyfuse3.init(ops, str(opts.mountpoint), fuse_options(opts))
    state["mounted"] = True
    if opts.readahead:
        nursery.start_soon(tune_readahead, opts.mountpoint, opts.readahead)
    log.info("mounted %s (cache %s, registry %s)", opts.mountpoint, cache.root,
             opts.registry.url)
    nursery.start_soon(_announce_when_answering, opts.mountpoint, ready)
    try:
        await pyfuse3.main()
        notify("STOPPING=1")  # (the loop has stopped serving: a blocking send is harmless)
        with trio.move_on_after(10, shield=True):
            try:
                await cache.commit_pending()
            except Exception as exc:  # e.g. a full disk: those chunks are fetched again
                log.warning("recording the last chunks at unmount failed: %s", exc)
        if not state.get("signalled"):
            # (not on SIGTERM/SIGINT: the mount is still there, and would not answer meanwhile)
            with trio.move_on_after(20, shield=True) as scope:
                await materializer.finish_seals()
            if scope.cancelled_caught:
                log.warning("unmounted before a seal finished; the next mount or pull seals it")
    finally:
        nursery.cancel_scope.cancel()
        state["close"] = materializer.close  # once the nursery's threads are done
        log.info("served: %d chunk fetches, %d chunks read back, peak %d bytes in flight, "
                 "%d bytes evicted, %d chunk buffers made", engine.fetches,
                 materializer.loads, engine.budget.peak, cache.budget.evicted_bytes,
                 cache.pool.created)


def run_foreground(opts: MountOptions) -> int:
    prepare_mountpoint(opts.mountpoint)
    write_pid(opts.mountpoint)

    def ready(error):
        if error is None:
            print(f"mounted {opts.mountpoint}", flush=True)

    try:
        trio.run(serve_mount, opts, ready)
    finally:
        pid_file(opts.mountpoint).unlink(missing_ok=True)
    return 0


def run_background(opts: MountOptions, log_file: pathlib.Path) -> int:
    """Fork a daemon that serves the mount; return once it is mounted (or failed)."""
    prepare_mountpoint(opts.mountpoint)
    opts.cache.mkdir(parents=True, exist_ok=True)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_end)
        code = _daemon(opts, log_file, write_end)
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode(errors="replace").strip()
    if message == "ok":
        print(f"mounted {opts.mountpoint} (daemon pid {pid}, log {log_file})", flush=True)
        return 0
    os.waitpid(pid, 0)
    raise MountError(message.removeprefix("error: ") or
                     f"the mount daemon exited before the mount was ready; see {log_file}")


def _daemon(opts: MountOptions, log_file: pathlib.Path, pipe_fd: int) -> int:
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s [{os.getpid()}] %(name)s %(levelname)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(min(root.level, logging.INFO) if root.level else logging.INFO)
    write_pid(opts.mountpoint)
    reported = False

    def ready(error):
        nonlocal reported
        reported = True
        os.write(pipe_fd, b"ok\n" if error is None else f"error: {error}\n".encode())
        os.close(pipe_fd)

    try:
        trio.run(serve_mount, opts, ready)
        return 0
    except BaseException as exc:  # the daemon has no one else to tell
        log.exception("mount daemon failed")
        if not reported:
            ready(str(exc) if isinstance(exc, ModelfsError) else f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        pid_file(opts.mountpoint).unlink(missing_ok=True)
        logging.shutdown()
