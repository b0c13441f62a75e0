"""The `modelfs` command line as users run it: real processes, a real server on 127.0.0.1."""

import os
import re
import signal
import sqlite3
import subprocess

import pytest
import trio

from modelfs.cache.units import FETCH_UNIT

from .gguf_factory import make_gguf_of_size
from .helpers import MODELFS, import_model, modelfs, sha256_file

MiB = 1 << 20


@pytest.fixture
def served(tmp_path):
    """`modelfs serve` as a subprocess over a models dir with one imported model."""
    models = tmp_path / "models"
    source = make_gguf_of_size(tmp_path / "m.gguf", 2 * MiB, seed=3)
    import_model(source, "tiny:q8", models, "--template", "T {{ .Prompt }}",
                 "--params", '{"stop": ["<end>"]}')
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(MODELFS + ["serve", "--models", str(models), "--listen",
                                       "127.0.0.1:0", "--chunk-size", "128K", "--state-dir",
                                       str(tmp_path / "state")],
                            stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving"), line
        yield {"url": line.split()[-1], "models": models, "source": source,
               "log": tmp_path / "serve.log", "tmp": tmp_path}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def test_import_serve_pull_round_trip(served):
    cache = served["tmp"] / "cache"
    r = modelfs("pull", "tiny:q8", "--registry", served["url"], "--cache", cache,
                "--chunk-size", "128K")
    assert r.returncode == 0, r.stderr
    assert "verified and sealed" in r.stdout
    assert "pulling tiny:q8" in r.stderr and "/s)" in r.stderr  # plain progress lines, no tty
    # the name Ollama users type, under Ollama's host: not the registry's address
    manifest = cache / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "q8"
    source_manifest = served["models"] / "manifests/registry.ollama.ai/library/tiny/q8"
    assert manifest.read_bytes() == source_manifest.read_bytes()
    for blob in (served["models"] / "blobs").iterdir():
        assert sha256_file(cache / "blobs" / blob.name) == "sha256:" + blob.name[7:]
    assert (cache / "blobs" / ("sha256-" + sha256_file(served["source"])[7:])).exists()
    # one log line per request at the server, with the ranges
    lines = served["log"].read_text().splitlines()
    # the model's 128 KiB chunks in fetch units, and the three small layers
    assert sum('"GET /v2/library/tiny/blobs/' in line for line in lines) == \
        -(-2 * MiB // FETCH_UNIT) + 3


@pytest.mark.parametrize("args, message", [
    (["pull", "../etc/passwd"], "invalid model name"),
    (["pull", "a" * 10_000], "invalid model name"),
    (["pull", "tiny", "--registry", "ftp://x"], "unsupported registry scheme"),
    (["pull", "tiny", "--registry", "http://127.0.0.1:9"], "cannot reach http://127.0.0.1:9"),
    (["import", "/nonexistent.gguf", "x"], "nonexistent.gguf"),
])
def test_errors_are_one_line(tmp_path, args, message):
    r = modelfs(*args, "--cache" if args[0] == "pull" else "--models", tmp_path / "c")
    assert r.returncode == 1
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("modelfs: error:")


def test_unknown_model_and_verification_failure(served):
    cache = served["tmp"] / "cache"
    r = modelfs("pull", "nosuch", "--registry", served["url"], "--cache", cache)
    assert (r.returncode, "Traceback" in r.stderr) == (1, False)
    assert "model nosuch:latest not found" in r.stderr

    # Corrupt the served blob after its chunk list was computed (same size and mtime, so the
    # server keeps trusting its list): the client must refuse the bytes.
    first = modelfs("pull", "tiny:q8", "--registry", served["url"], "--cache",
                    served["tmp"] / "warm", "--chunk-size", "128K")
    assert first.returncode == 0, first.stderr
    blob = served["models"] / "blobs" / ("sha256-" + sha256_file(served["source"])[7:])
    st = blob.stat()
    with open(blob, "r+b") as f:
        f.seek(300_000)
        byte = f.read(1)
        f.seek(300_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = modelfs("pull", "tiny:q8", "--registry", served["url"], "--cache", cache,
                "--chunk-size", "128K")
    assert r.returncode == 1
    assert re.search(r"does not match (its digest|the digests of its \d+ registry chunks)",
                     r.stderr) and "Traceback" not in r.stderr
    assert not (cache / "blobs" / blob.name).exists()


async def test_pull_killed_halfway_resumes_missing_chunks_only(live_registry, tmp_path):
    reg = await live_registry(chunk_size=64 << 10)
    _, imported = reg.add_model("big", 4 * MiB)
    d = imported.model.digest
    reg.faults.delay = 0.03
    cache = tmp_path / "cache"
    args = MODELFS + ["pull", "big", "--registry", reg.url, "--cache", str(cache),
                      "--chunk-size", "64K", "--concurrency", "4", "--fetch-unit", "0"]
    proc = await trio.lowlevel.open_process(args, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)
    try:
        def recorded() -> int:
            try:
                with sqlite3.connect(f"file:{cache / 'index.sqlite'}?mode=ro", uri=True) as db:
                    return db.execute("SELECT count(*) FROM chunks WHERE digest=? AND present",
                                      (d,)).fetchone()[0]
            except sqlite3.Error:
                return 0

        # killed once some chunks are recorded (their fdatasync is batched) and more are asked for
        with trio.fail_after(60):
            while len(reg.faults.ranges(d)) < 24 or not recorded():
                await trio.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
    # Requests the killed pull had already sent may still sit in the server's socket buffer;
    # they belong to the first run, so wait for the server to go quiet before drawing the line.
    with trio.fail_after(10):
        quiet_since, seen = trio.current_time(), len(reg.faults.seen)
        while reg.faults.in_flight or trio.current_time() - quiet_since < 0.5:
            await trio.sleep(0.05)
            if len(reg.faults.seen) != seen:
                quiet_since, seen = trio.current_time(), len(reg.faults.seen)
    first_run = reg.faults.ranges(d)
    assert not (cache / "blobs" / ("sha256-" + d[7:])).exists()

    with sqlite3.connect(cache / "index.sqlite") as db:
        rows = db.execute('SELECT start, "end", present FROM chunks WHERE digest=?',
                          (d,)).fetchall()
    present = {f"bytes={s}-{e - 1}" for s, e, p in rows if p}
    missing = {f"bytes={s}-{e - 1}" for s, e, p in rows if not p}
    assert present and missing and len(rows) == 64

    reg.faults.delay = 0
    result = await trio.run_process(args, capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 0, result.stderr
    second_run = reg.faults.ranges(d)[len(first_run):]
    assert sorted(second_run) == sorted(missing)  # each missing chunk once, nothing present
    assert sha256_file(cache / "blobs" / ("sha256-" + d[7:])) == d


async def test_pull_gives_up_on_a_source_that_always_ignores_range(live_registry, tmp_path):
    """A proxy that answers every Range request with 200 and the whole blob: `modelfs pull`
    asks for its first chunk exactly as many times as the retry policy allows, then stops with
    one line that says what the source kept doing; nothing lands in blobs/, nothing is recorded
    as present and no manifest is written."""
    from modelfs.fetcher.retry import RetryPolicy

    from . import faults as F

    attempts = RetryPolicy().attempts  # what the CLI uses
    reg = await live_registry(chunk_size=64 << 10)
    reg.add_model("stubborn", 1 * MiB)
    reg.faults.add("GET", "/blobs/", F.without_range())
    cache = tmp_path / "cache"
    r = await trio.run_process(
        MODELFS + ["pull", "stubborn", "--registry", reg.url, "--cache", str(cache),
                   "--chunk-size", "64K", "--concurrency", "1"],
        capture_stdout=True, capture_stderr=True, check=False)
    stderr = r.stderr.decode()
    assert r.returncode == 1, stderr
    asked = [(s.path, s.range) for s in reg.faults.seen if "/blobs/" in s.path]
    assert len(asked) == attempts and len(set(asked)) == 1  # one chunk, `attempts` times
    assert all(s.status == 200 for s in reg.faults.seen if "/blobs/" in s.path)
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("modelfs: error:")]
    assert errors == [stderr.strip().splitlines()[-1]]
    assert "ignored Range" in errors[0] and "answered 200 with the whole body" in errors[0]
    assert f"gave up after {attempts} attempts, each failing like this" in errors[0]
    kept = [p.relative_to(cache) for p in cache.rglob("*") if p.is_file()]
    assert not [p for p in kept if p.parts[0] in ("blobs", "manifests")], kept
    with sqlite3.connect(cache / "index.sqlite") as db:
        assert db.execute("SELECT count(*) FROM chunks WHERE present").fetchone()[0] == 0


def test_pull_refuses_a_model_larger_than_the_cap(served):
    cache = served["tmp"] / "capped"
    r = modelfs("pull", "tiny:q8", "--registry", served["url"], "--cache", cache,
                "--cache-max", "1M")
    assert r.returncode == 1 and "more than the cache cap" in r.stderr
    assert not list((cache / "blobs").iterdir())
    r = modelfs("pull", "tiny:q8", "--registry", served["url"], "--cache", cache,
                "--cache-max", "64M", "--chunk-size", "128K")
    assert r.returncode == 0, r.stderr
