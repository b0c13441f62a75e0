"""The mount as the system runs it: the real mount(8) and mount.fuse3 for `-t fuse.modelfs`
and an fstab line (`mount -T FILE`), the systemd unit (checked by systemd-analyze, its
ExecStart run with a NOTIFY_SOCKET we listen on), all against `modelfs serve` on 127.0.0.1."""

from __future__ import annotations

import configparser
import os
import pathlib
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading

import pytest

from modelfs.fs.mount import is_stale, mount_type

from .gguf_factory import make_gguf_of_size
from .helpers import import_model, modelfs, sha256_file, stop_process
from .mounting import Mount, Server, fuse_available, mounted

pytestmark = fuse_available
MiB = 1 << 20
ROOT = pathlib.Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "modelfs@.service"
HELPER = "/usr/local/bin/modelfs"  # where mount.fuse3 finds `modelfs` (scripts/setup)


@pytest.fixture
def world(tmp_path):
    """Two models served on 127.0.0.1 with 1 MiB chunks; every mount detached at the end."""
    if os.path.realpath(HELPER) != os.path.realpath(os.path.join(sys.prefix, "bin", "modelfs")):
        pytest.fail(f"{HELPER} does not lead to this checkout's modelfs "
                    f"({os.path.realpath(HELPER)}): run scripts/setup")
    models, src = tmp_path / "models", tmp_path / "src"
    src.mkdir()
    sources = {}
    for name, size, seed in [("tiny:q1", 6 * MiB + 12345, 1), ("alice/other:v2", 3 * MiB, 2)]:
        sources[name] = make_gguf_of_size(src / f"{seed}.gguf", size, seed=seed)
        import_model(sources[name], name, models)
    server = Server(models, tmp_path / "state", tmp_path / "serve.log").start()
    mounts = []

    def new_mount(name="mnt"):
        m = Mount(tmp_path / name, tmp_path / "cache", server.url)
        mounts.append(m)
        return m

    try:
        yield {"server": server, "sources": sources, "mount": new_mount, "tmp": tmp_path}
    finally:
        for m in mounts:
            m.cleanup()
        server.stop()


def mount_line(path: pathlib.Path) -> list[str]:
    """The /proc/mounts fields (source, target, type, options) of the mount at `path`."""
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[1] == str(path):
                return fields[:4]
    raise AssertionError(f"{path} is not mounted")


def umount(m: Mount) -> None:
    """The real umount(8): the daemon sees its mount go, finishes and exits."""
    r = subprocess.run(["umount", str(m.path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert m.wait_gone(20), "the daemon outlived its mount"
    m.lives[-1] = (m.cache, True)
    assert not mounted(m.path)


def daemons_for(path: pathlib.Path) -> list[int]:
    """Processes whose command line names `path` (a daemon that should not be there)."""
    out = []
    for entry in pathlib.Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if entry.name.isdigit() and str(path).encode() in argv:
            out.append(int(entry.name))
    return out


def test_mount_t_fuse_modelfs_with_options(world):
    """`mount -t fuse.modelfs REGISTRY MNT -o ...`: mount(8) runs mount.fuse3, which runs
    /usr/local/bin/modelfs; the options reach the mount, mount(8)'s own are ignored, and it
    returns with the mount up; umount(8) ends the daemon."""
    m = world["mount"]()
    url = world["server"].url
    options = (f"cache={m.cache},cache_max=64M,max_inflight=2M,max_fetches=2,"
               f"prefetch=sequential,read_timeout=30,model=tiny:q1,model=alice/other:v2,"
               f"allow_other,_netdev,nofail,defaults")
    r = m.run(["mount", "-t", "fuse.modelfs", url, str(m.path), "-o", options])
    assert re.search(r"mounted .* \(daemon pid \d+", r.stdout) and m.alive()
    source, target, fstype, opts = mount_line(m.path)
    assert (source, fstype) == (url, "fuse.modelfs")  # fsname: the fstab source, for mount -a
    assert {"ro", "nosuid", "nodev", "allow_other"} <= set(opts.split(","))
    # both models pinned at mount time: listed before any lookup
    assert {"tiny:q1", "alice"} <= set(os.listdir(m.path))
    for name, source_file in world["sources"].items():
        assert sha256_file(m.path / name / "model.gguf") == sha256_file(source_file)
    status = modelfs("status", "--cache", m.cache, "--json")
    assert '"cap": 67108864' in status.stdout, status.stdout  # cache_max=64M
    umount(m)
    peak = int(re.search(r"peak (\d+) bytes in flight", m.log()).group(1))
    assert 0 < peak <= 2 * MiB  # max_inflight=2M held (the default 64M would not have)


def test_fstab_line(world):
    """An /etc/fstab line, through `mount -T FILE` (an alternative fstab): by its mount point,
    and by `mount -a`, which mounts it once and then sees it mounted."""
    m = world["mount"]()
    fstab = world["tmp"] / "fstab"
    fstab.write_text(f"# modelfs\n{world['server'].url} {m.path} fuse.modelfs "
                     f"cache={m.cache},cache_max=20G,model=tiny:q1,_netdev,nofail,"
                     f"x-systemd.automount,x-systemd.idle-timeout=600 0 0\n")
    m.run(["mount", "-T", str(fstab), str(m.path)])
    assert mount_line(m.path)[2] == "fuse.modelfs"
    assert "tiny:q1" in os.listdir(m.path)
    assert sha256_file(m.path / "tiny:q1" / "model.gguf") == \
        sha256_file(world["sources"]["tiny:q1"])
    umount(m)
    m.run(["mount", "-T", str(fstab), "-a"])
    again = subprocess.run(["mount", "-T", str(fstab), "-a", "-v"], capture_output=True,
                           text=True)
    assert again.returncode == 0 and "already mounted" in again.stdout + again.stderr
    assert sum(line.split()[1] == str(m.path) for line in open("/proc/self/mounts")) == 1
    umount(m)


@pytest.mark.parametrize("options,code,message", [
    ("bogus,cache_max=1G", 1, "unknown mount option: bogus"),
    ("cache_max=lots", 1, "mount option cache_max: invalid size 'lots'"),
    ("prefetch=eager", 1, "mount option prefetch: invalid choice"),
    ("model=../../etc", 32, "invalid"),
])
def test_bad_options_are_refused(world, options, code, message):
    """mount(8) passes on the helper's message and exit code; nothing is left mounted or
    running."""
    m = world["mount"]()
    m.path.mkdir()
    r = m.run(["mount", "-t", "fuse.modelfs", world["server"].url, str(m.path), "-o",
               f"cache={m.cache},{options}"], check=False)
    assert r.returncode == code, (r.stdout, r.stderr)
    assert r.stderr.startswith("modelfs: error: ") and message in r.stderr, r.stderr
    assert not mounted(m.path) and not is_stale(m.path)
    assert daemons_for(m.path) == []


def test_unreachable_registry_fails_the_mount(world):
    m = world["mount"]()
    m.path.mkdir()
    world["server"].stop()
    r = m.run(["mount", "-t", "fuse.modelfs", world["server"].url, str(m.path), "-o",
               f"cache={m.cache},model=tiny:q1"], check=False)
    assert r.returncode == 32 and "cannot reach" in r.stderr, r.stderr
    assert not mounted(m.path) and daemons_for(m.path) == []


# -- systemd ------------------------------------------------------------------------------------

def test_unit_file_verifies(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("no systemd-analyze here")
    unit = tmp_path / "modelfs@srv-models.service"  # an instance: %i and %f resolve
    shutil.copy(UNIT, unit)
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr  # (warnings fail it too)


def answers(path: pathlib.Path) -> bool:
    """The mount at `path` is up and its daemon answers a statfs within 5 s."""
    if not mounted(path):
        return False
    answered = []

    def probe():
        try:
            answered.append(os.statvfs(path))
        except OSError:
            pass
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(5)
    return bool(answered)


def unit_command(mountpoint: pathlib.Path, args: str) -> list[str]:
    """The unit's ExecStart for `mountpoint`, with MODELFS_ARGS=`args` (systemd splits $VAR
    at whitespace)."""
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str
    unit.read(UNIT)
    service = unit["Service"]
    assert (service["Type"], service["Restart"]) == ("notify", "on-failure")
    command = service["ExecStart"].replace("%f", str(mountpoint))
    return [word for part in shlex.split(command)
            for word in (args.split() if part == "$MODELFS_ARGS" else [part])]


class NotifyListener:
    """A datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, address: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(30)
        self.address = address

    def receive(self) -> str:
        return self.sock.recv(4096).decode()

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("address", ["path", "@abstract"])
def test_unit_command_notifies_ready_then_stopping(world, address):
    """The unit's ExecStart (`modelfs mount --foreground`) under Type=notify: READY=1 comes
    only once the mount answers; an unmount sends STOPPING=1 and the daemon exits 0."""
    m = world["mount"]()
    m.path.mkdir()
    sock = (str(world["tmp"] / "notify.sock") if address == "path"
            else f"@modelfs-test-{os.getpid()}-{m.path.stat().st_ino}")
    listener = NotifyListener(sock)
    env = dict(os.environ, NOTIFY_SOCKET=sock, MODELFS_REGISTRY=world["server"].url)
    command = unit_command(m.path, f"--cache {m.cache} --model tiny:q1")
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(world["tmp"] / "fg.log", "w"))
    try:
        message = listener.receive()
        # (sent before the mount answered, READY=1 would find it absent or not answering)
        assert message.splitlines() == ["READY=1", f"STATUS=serving {m.path}"]
        assert answers(m.path)
        assert sha256_file(m.path / "tiny:q1" / "model.gguf") == \
            sha256_file(world["sources"]["tiny:q1"])
        subprocess.run(["fusermount3", "-u", str(m.path)], check=True)
        assert listener.receive() == "STOPPING=1"
        assert proc.wait(30) == 0 and not mounted(m.path)
    finally:
        stop_process(proc)
        listener.close()


def test_unit_stop_unmounts_with_files_open(world):
    """systemd stops the unit with SIGTERM (KillMode=mixed: the main process): the mount goes
    away cleanly, even with a file held open, and the daemon exits 0 (no restart)."""
    m = world["mount"]()
    m.path.mkdir()
    listener = NotifyListener(str(world["tmp"] / "notify.sock"))
    env = dict(os.environ, NOTIFY_SOCKET=listener.address,
               MODELFS_REGISTRY=world["server"].url)
    proc = subprocess.Popen(unit_command(m.path, f"--cache {m.cache}"), env=env,
                            stdout=subprocess.DEVNULL, stderr=open(world["tmp"] / "fg.log", "w"))
    held = None
    try:
        assert listener.receive().startswith("READY=1")
        held = os.open(m.path / "tiny:q1" / "model.gguf", os.O_RDONLY)
        assert os.read(held, 4) == b"GGUF"
        proc.send_signal(signal.SIGTERM)
        assert listener.receive() == "STOPPING=1"
        assert proc.wait(30) == 0
        assert not mounted(m.path)
        assert "got SIGTERM; unmounting" in (world["tmp"] / "fg.log").read_text()
    finally:
        if held is not None:
            try:
                os.close(held)
            except OSError:  # ENOTCONN: its filesystem is gone, as it should be
                pass
        stop_process(proc)
        listener.close()


async def test_ready_waits_until_the_mount_answers(world, monkeypatch):
    """What the daemon runs once the kernel mount is made (fs/mount.py): it reports ready,
    and sends READY=1, only when a statfs of the mount has been answered. Pointed at a real
    mount whose daemon is stopped (SIGSTOP: mounted, not answering), it waits; once the
    daemon runs again, it reports."""
    import trio

    from modelfs.fs.mount import _announce_when_answering

    m = world["mount"]()
    m.path.mkdir()
    listener = NotifyListener(str(world["tmp"] / "notify.sock"))
    env = dict(os.environ, MODELFS_REGISTRY=world["server"].url)
    proc = subprocess.Popen(unit_command(m.path, f"--cache {m.cache}"), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().startswith("mounted")  # (not notified: no socket)
        proc.send_signal(signal.SIGSTOP)
        # (anything that stats the mount now waits for the daemon: let it go on regardless
        # after a while, so that a broken test fails instead of hanging)
        watchdog = threading.Timer(15, proc.send_signal, (signal.SIGCONT,))
        watchdog.start()
        monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
        listener.sock.setblocking(False)
        reported = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_announce_when_answering, m.path, reported.append)
            await trio.sleep(1.0)
            assert reported == [] and mount_type(m.path) == "fuse.modelfs"  # (no stat)
            with pytest.raises(BlockingIOError):
                listener.receive()
            proc.send_signal(signal.SIGCONT)
            with trio.fail_after(10):
                while not reported:
                    await trio.sleep(0.02)
        assert reported == [None]
        listener.sock.settimeout(5)
        assert listener.receive().startswith("READY=1")
    finally:
        proc.send_signal(signal.SIGCONT)
        if "watchdog" in locals():
            watchdog.cancel()
        stop_process(proc)
        listener.close()
