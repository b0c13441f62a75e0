"""The main job, end to end on this machine: make a real GGUF model, import it into a models
directory, serve that directory as a registry on 127.0.0.1, mount it with an empty cache, and
read the model through the mount with the `gguf` package's reader, as an engine would.

Everything lives in a temporary directory that is removed at the end (--keep keeps it); the
mount is unmounted and the server stopped by its pid, whatever happens.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.gguf_factory import make_gguf_of_size  # noqa: E402

MODELFS = [sys.executable, "-m", "modelfs.fs.cli"]
MiB = 1 << 20


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(*args: str) -> str:
    print("$ modelfs " + " ".join(args), flush=True)
    out = subprocess.run(MODELFS + list(args), check=True, stdout=subprocess.PIPE, text=True)
    print(out.stdout, end="", flush=True)
    return out.stdout


def sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(MiB):
            h.update(piece)
    return h.hexdigest()


def start_server(models: pathlib.Path, state: pathlib.Path, log: pathlib.Path):
    proc = subprocess.Popen(MODELFS + ["serve", "--models", str(models), "--listen",
                                       "127.0.0.1:0", "--state-dir", str(state)],
                            stdout=subprocess.PIPE, stderr=open(log, "wb"), text=True)
    line = proc.stdout.readline()  # "serving DIR on http://127.0.0.1:PORT"
    if not line.startswith("serving"):
        proc.kill()
        raise SystemExit(f"server did not start; see {log}")
    return proc, line.rsplit(" ", 1)[-1].strip()


def show_tree(mnt: pathlib.Path) -> None:
    for path in sorted(mnt.rglob("*")):
        name = f"{path.relative_to(mnt)}{'/' if path.is_dir() else ''}"
        size = "" if path.is_dir() else f"{path.stat().st_size:>14,} bytes"
        print(f"  {name:<40}{size}")


def read_with_gguf(path: pathlib.Path, source: pathlib.Path) -> None:
    import gguf
    import numpy as np
    t0 = time.monotonic()
    reader = gguf.GGUFReader(path)  # memory-mapped, like llama.cpp
    arch = reader.fields["general.architecture"].contents()
    print(f"  gguf reader opened it in {time.monotonic() - t0:.3f}s: architecture {arch}, "
          f"{len(reader.tensors)} tensors")
    local = gguf.GGUFReader(source)
    same = all(a.name == b.name and np.array_equal(a.data, b.data)
               for a, b in zip(reader.tensors, local.tensors))
    print(f"  every tensor equal to the source file: {same}")
    if not same:
        raise SystemExit("tensor data differs")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default=256, type=int, help="model size in MiB (default 256)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()

    work = pathlib.Path(tempfile.mkdtemp(prefix="modelfs-demo-"))
    mnt = work / "mnt"
    server = mounted = None
    try:
        step(f"make a {args.size} MiB GGUF model with the gguf package")
        source = make_gguf_of_size(work / "tiny.gguf", args.size * MiB, seed=7)
        print(f"{source} ({source.stat().st_size:,} bytes)")

        step("import it into a models directory, as `ollama create` would")
        models = work / "models"
        run("import", str(source), "demo/tiny:latest", "--models", str(models),
            "--template", "{{ .Prompt }}", "--system", "You are a tiny demo model.",
            "--params", '{"temperature": 0.2}')

        step("serve the models directory as a registry on 127.0.0.1")
        server, url = start_server(models, work / "serve-state", work / "serve.log")
        print(f"registry at {url} (request log: {work / 'serve.log'})")

        step("mount it with an empty cache: nothing is downloaded yet")
        mnt.mkdir()
        cache = work / "cache"
        run("mount", str(mnt), "--registry", url, "--cache", str(cache),
            "--model", "demo/tiny")
        mounted = mnt
        show_tree(mnt)
        model = mnt / "demo" / "tiny:latest" / "model.gguf"
        print(f"  template: {(model.parent / 'template').read_text()!r}")

        step("read the model through the mount")
        t0 = time.monotonic()
        with open(model, "rb") as f:
            first = f.read(MiB)
        ttfb = time.monotonic() - t0
        print(f"  first MiB after {ttfb * 1000:.0f} ms (cold)")
        t0 = time.monotonic()
        digest = sha256(model)
        whole = time.monotonic() - t0
        size = model.stat().st_size
        print(f"  whole file read (and hashed) through the mount in {whole:.2f}s "
              f"({size / MiB / max(whole, 1e-9):.0f} MiB/s)")
        read_with_gguf(model, source)
        same = digest == sha256(source) and first == source.read_bytes()[:MiB]
        print(f"  identical to the source GGUF: {same}")
        cached = int(os.getxattr(model, "user.modelfs.cached"))
        print(f"  cached: {cached:,} of {size:,} bytes")
        # The whole-blob check waits until the readers pause, then runs at low priority.
        sealed_path = cache / "blobs" / ("sha256-" + digest)
        t0 = time.monotonic()
        while not sealed_path.exists() and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        print(f"  blob sealed in the cache (whole-file sha256 checked against the manifest): "
              f"{sealed_path.exists()}, {time.monotonic() - t0:.1f}s after the last read")
        requests = sum(1 for line in open(work / "serve.log") if '"GET ' in line)
        print(f"  the server answered {requests} GET requests")

        step("unmount")
        run("unmount", str(mnt))
        mounted = None
        return 0 if same else 1
    finally:
        if mounted is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(mounted)], capture_output=True)
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
        if args.keep:
            print(f"\nkept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
