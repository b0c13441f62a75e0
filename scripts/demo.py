"""The main job, end to end on this machine: make a real GGUF model, import it into a models
directory, serve that directory as a registry on 127.0.0.1, pull the model through the registry
protocol into a fresh cache, and show that what arrived is verified and identical.

Everything lives in a temporary directory that is removed at the end (--keep keeps it); the
server is stopped by its pid whatever happens.
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


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(*args: str) -> None:
    print("$ modelfs " + " ".join(args), flush=True)
    subprocess.run(MODELFS + list(args), check=True)


def sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1 << 20):
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default=96, type=int, help="model size in MiB (default 96)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()

    work = pathlib.Path(tempfile.mkdtemp(prefix="modelfs-demo-"))
    server = None
    try:
        step(f"make a {args.size} MiB GGUF model with the gguf package")
        source = make_gguf_of_size(work / "tiny.gguf", args.size << 20, seed=7)
        print(f"{source} ({source.stat().st_size} bytes)")

        step("import it into a models directory, as `ollama create` would")
        models = work / "models"
        run("import", str(source), "demo/tiny:latest", "--models", str(models),
            "--template", "{{ .Prompt }}", "--system", "You are a tiny demo model.",
            "--params", '{"temperature": 0.2}')

        step("serve the models directory as a registry on 127.0.0.1")
        server, url = start_server(models, work / "serve-state", work / "serve.log")
        print(f"registry at {url} (request log: {work / 'serve.log'})")

        step("pull it through the registry protocol into an empty cache")
        cache = work / "cache"
        t0 = time.monotonic()
        run("pull", "demo/tiny", "--registry", url, "--cache", str(cache))
        print(f"pull took {time.monotonic() - t0:.2f}s")

        step("the verified result")
        for path in sorted(cache.rglob("*")):
            if path.is_file() and "partial" not in path.parts and path.name != "index.sqlite" \
                    and not path.name.startswith("index.sqlite"):
                print(f"  {path.relative_to(cache)}  {path.stat().st_size} bytes")
        pulled = cache / "blobs" / f"sha256-{sha256(source)}"
        same = pulled.exists() and sha256(pulled) == sha256(source)
        print(f"model blob identical to the source GGUF: {same}")
        requests = sum(1 for line in open(work / "serve.log") if '"GET ' in line)
        print(f"the server answered {requests} GET requests")
        return 0 if same else 1
    finally:
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
