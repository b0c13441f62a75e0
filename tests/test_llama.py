"""llama.cpp loads a GGUF through a cold mount and generates exactly what it generates locally.

The engine is the real llama-cpp-python, installed from the prebuilt wheel in
`<repo>/../shared/wheels/` (or the wheel named by MODELFS_LLAMA_WHEEL) when it is not already
importable; its dependencies come from PyPI. Where it cannot be installed or imported the tests
are skipped, never faked. The model is generated here (tests/llama_model.py); nothing else is
downloaded.

llama.cpp runs in a child process (a short script printing JSON), so its stderr and any crash
stay out of pytest, and a hung load can be killed on a timeout.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import time

import pytest

from .helpers import import_model, sha256_file
from .llama_model import make_tiny_llama
from .mounting import Mount, Server, fuse_available

pytestmark = fuse_available

REPO = pathlib.Path(__file__).resolve().parents[1]
WHEEL_DIR = REPO.parent / "shared" / "wheels"
WHEEL_ENV = "MODELFS_LLAMA_WHEEL"
MODEL = "tinyllama:f32"
CHUNK = 1 << 20  # the server's --chunk-size 1M
PROMPTS = ["Hello world", "the model file is read from a cold mount", "llama token 42?"]
N_TOKENS = 16
LLAMA_TIMEOUT = 60
PIP_TIMEOUT = 150


# -- the engine -----------------------------------------------------------------------------------

def _import_check() -> subprocess.CompletedProcess:
    # In a child: an import that dies (e.g. SIGILL on a CPU without AVX2) must not take pytest.
    return subprocess.run([sys.executable, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                          capture_output=True, text=True, timeout=60)


def _find_wheel() -> pathlib.Path | None:
    named = os.environ.get(WHEEL_ENV)
    if named:
        path = pathlib.Path(named)
        return path if path.is_file() else None
    # `shared/` sits beside the checkout; a clone elsewhere (CI) looks up its parents too.
    # (and /work/shared: where this workplace keeps it when a clone lives elsewhere, e.g. CI)
    for base in (REPO, *REPO.parents, pathlib.Path("/work")):
        wheels = sorted((base / "shared" / "wheels").glob("llama_cpp_python-*.whl"))
        if wheels:
            return wheels[-1]
    return None


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@pytest.fixture(scope="session")
def llama_python() -> str:
    """The interpreter that can `import llama_cpp`, installing the wheel into it if needed."""
    if _import_check().returncode == 0:
        return sys.executable
    wheel = _find_wheel()
    if wheel is None:
        where = os.environ.get(WHEEL_ENV) or f"{WHEEL_DIR}/llama_cpp_python-*.whl"
        pytest.skip(f"llama_cpp is not importable and there is no wheel at {where}")
    try:
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", str(wheel)],
                             capture_output=True, text=True, timeout=PIP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.skip(f"pip install {wheel.name} took over {PIP_TIMEOUT} s")
    if pip.returncode != 0:
        pytest.skip(f"pip install {wheel.name} failed (exit {pip.returncode}):\n"
                    f"{_tail(pip.stderr or pip.stdout)}")
    check = _import_check()
    if check.returncode != 0:
        pytest.skip(f"llama_cpp installed from {wheel.name} but does not import "
                    f"(exit {check.returncode}):\n{_tail(check.stderr)}")
    return sys.executable


# llama.cpp's load modes (`--load-mode`): mmap (MAP_POPULATE), none (one read() per tensor),
# mlock (read() into locked memory), dio (O_DIRECT reads; newer Ollama passes it on some hosts).
LOAD_MODES = ["mmap", "none", "mlock", "dio"]

# Greedy decoding, token by token: the prompt's tokens, the first N generated token ids, and
# their bytes. The sampler is greedy (temp 0), so the output depends only on the logits.
# llama-cpp-python's Llama() sets model_params.load_mode from use_mmap/use_mlock only (none,
# mmap, mlock, mmap+mlock): for dio, the constant it picks for "none" is set to llama.cpp's
# own value for the mode's name before the model is loaded. The mode in effect is printed.
_RUNNER = textwrap.dedent("""
    import ctypes, json, resource, sys, time
    import llama_cpp
    import llama_cpp.llama_cpp as api

    path, mode, n_tokens, prompts = sys.argv[1], sys.argv[2], int(sys.argv[3]), \\
        json.loads(sys.argv[4])
    if mode not in ("mmap", "mlock"):
        api.LLAMA_LOAD_MODE_NONE = api.llama_load_mode_from_str(mode.encode())
    mlock_works = None
    if mode == "mlock":  # can this host lock memory at all? (one page, as llama.cpp would)
        try:  # the usual 8 MiB limit is less than the model: lift it where we may
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY,) * 2)
        except (ValueError, OSError):
            pass
        libc, page = ctypes.CDLL(None, use_errno=True), ctypes.create_string_buffer(8192)
        mlock_works = libc.mlock(ctypes.addressof(page), ctypes.c_size_t(4096)) == 0
    t0 = time.monotonic()
    llm = llama_cpp.Llama(model_path=path, n_threads=1, n_threads_batch=1, n_ctx=128, seed=1234,
                          verbose=True, use_mmap=mode == "mmap", use_mlock=mode == "mlock")
    load = time.monotonic() - t0
    out = []
    for prompt in prompts:
        tokens = llm.tokenize(prompt.encode())
        generated = []
        for token in llm.generate(tokens, temp=0.0, top_k=1, reset=True):
            generated.append(token)
            if len(generated) >= n_tokens:
                break
        out.append({"prompt": prompt, "prompt_tokens": tokens, "tokens": generated,
                    "bytes": llm.detokenize(generated).hex()})
    print(json.dumps({"load_seconds": load, "total_seconds": time.monotonic() - t0,
                      "load_mode": api.llama_load_mode_name(llm.model_params.load_mode).decode(),
                      "mlock_works": mlock_works,
                      "n_vocab": llm.n_vocab(), "runs": out}))
""")


def run_llama(python: str, model: pathlib.Path, mode: str) -> dict:
    """llama.cpp's output for `model` loaded in `mode`, with its log (`stderr`)."""
    proc = subprocess.Popen([python, "-c", _RUNNER, str(model), mode,
                             str(N_TOKENS), json.dumps(PROMPTS)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=LLAMA_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:  # a read stuck in the mount ends when teardown unmounts it; don't wait for that
            _, stderr = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            stderr = "(still blocked after SIGKILL)"
        pytest.fail(f"llama.cpp on {model} (load mode {mode}) did not finish in "
                    f"{LLAMA_TIMEOUT} s:\n{_tail(stderr)}")
    assert proc.returncode == 0, \
        f"llama.cpp on {model} (load mode {mode}) exited {proc.returncode}:\n{_tail(stderr)}"
    result = json.loads(stdout.strip().splitlines()[-1])
    result["stderr"] = stderr
    assert result["load_mode"] == mode, _tail(stderr)
    # the mode really ran: no silent fallback to buffered reads (dio: the O_DIRECT open and
    # its aligned reads worked), and memory locked where this host can lock any
    assert "Falling back" not in stderr, _tail(stderr)
    if result["mlock_works"]:
        assert "failed to mlock" not in stderr, _tail(stderr)
    return result


# -- the model, served and mounted ----------------------------------------------------------------

def _covered(ranges: list[str], size: int) -> bool:
    spans = sorted((int(m[1]), int(m[2])) for r in ranges
                   if (m := re.fullmatch(r"bytes=(\d+)-(\d+)", r)))
    end = 0
    for start, last in spans:
        if start > end:
            return False
        end = max(end, last + 1)
    return end >= size


@pytest.fixture
def served(tmp_path):
    """The tiny llama, imported into a models dir and served with 1 MiB chunks."""
    source = make_tiny_llama(tmp_path / "tiny-llama.gguf", seed=7)
    models = tmp_path / "models"
    import_model(source, MODEL, models)
    name, tag = MODEL.split(":")
    doc = json.loads((models / "manifests" / "registry.ollama.ai" / "library" / name / tag)
                     .read_bytes())
    layer = next(x for x in doc["layers"] if x["mediaType"].endswith(".model"))
    assert layer["size"] == source.stat().st_size and layer["digest"] == sha256_file(source)
    assert layer["size"] > 2 * CHUNK  # the load has to cross chunk boundaries
    server = Server(models, tmp_path / "state", tmp_path / "serve.log", chunk_size="1M").start()
    try:
        yield {"source": source, "layer": layer, "server": server, "tmp": tmp_path}
    finally:
        server.stop()


@pytest.mark.parametrize("mode", LOAD_MODES)
def test_llama_generates_the_same_tokens_through_a_cold_mount(served, llama_python, mode):
    server, layer, tmp = served["server"], served["layer"], served["tmp"]
    digest, size = layer["digest"], layer["size"]

    t0 = time.monotonic()
    local = run_llama(llama_python, served["source"], mode)
    t_local = time.monotonic() - t0

    cache = tmp / "cache"
    assert not cache.exists()  # cold: nothing of the model on this side yet
    mount = Mount(tmp / "mnt", cache, server.url)
    try:
        mount.start()
        model = mount.path / MODEL / "model.gguf"
        assert model.stat().st_size == size
        assert server.ranges(digest) == []  # mounting and stat fetch no blob bytes

        t0 = time.monotonic()
        mounted = run_llama(llama_python, model, mode)
        t_mounted = time.monotonic() - t0

        # the load went through the mount: the blob came from the server, in ranges that
        # cover all of it (llama.cpp reads every tensor), and ended sealed in the cache
        ranges = server.ranges(digest)
        assert ranges, "llama.cpp loaded the model without a single range request"
        assert _covered(ranges, size), ranges
        blob = cache / "blobs" / digest.replace(":", "-")
        deadline = time.monotonic() + 10
        while not (blob.exists() and blob.stat().st_size == size) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert blob.exists() and blob.stat().st_size == size, mount.log()
        assert sha256_file(blob) == digest
    finally:
        mount.cleanup()

    if mounted["mlock_works"] is False:
        print("\n(mlock: this host cannot lock memory at all, not even one page: llama.cpp "
              "loaded with read() and warned)")
    print(f"\nload mode {mode}: local {t_local:.2f} s (load {local['load_seconds']:.3f} s), "
          f"cold mount {t_mounted:.2f} s (load {mounted['load_seconds']:.3f} s), "
          f"{len(ranges)} range requests")

    assert mounted["n_vocab"] == local["n_vocab"]
    for here, there in zip(local["runs"], mounted["runs"], strict=True):
        assert here["prompt_tokens"] == there["prompt_tokens"]
        assert len(here["tokens"]) == N_TOKENS
        assert there["tokens"] == here["tokens"], here["prompt"]
        assert there["bytes"] == here["bytes"]
        assert len(set(here["tokens"])) > 1, f"degenerate generation for {here['prompt']!r}"
    # the generations depend on the prompt: the model is not a constant
    assert len({tuple(run["tokens"]) for run in local["runs"]}) == len(PROMPTS)
