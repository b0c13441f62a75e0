"""Watching a model load: `modelfs status` beside a live mount, `--watch`, and the Prometheus
metrics of `mount` and `serve`, fetched over HTTP and parsed with prometheus-client's parser."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .gguf_factory import make_gguf_of_size
from .helpers import MODELFS, free_port, import_model, sha256_file
from .mounting import Mount, Server, fuse_available

pytestmark = fuse_available

MiB = 1 << 20


def _status(cache) -> dict:
    out = subprocess.run(MODELFS + ["status", "--cache", str(cache), "--json"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _metrics(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of the metrics page as {(name, sorted labels): value}."""
    page = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert page.status_code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(page.text) for s in family.samples}


def _served(tmp_path, size, *serve_extra):
    models = tmp_path / "models"
    source = make_gguf_of_size(tmp_path / "src.gguf", size, seed=5)
    import_model(source, "m:1", models)
    server = Server(models, tmp_path / "state", tmp_path / "serve.log", "256K",
                    *serve_extra).start()
    return source, server


def test_status_and_metrics_follow_a_live_mount(tmp_path):
    source, server = _served(tmp_path, 6 * MiB)
    metrics_port = free_port()
    m = Mount(tmp_path / "mnt", tmp_path / "cache", server.url, "--prefetch", "none",
              "--metrics", f"127.0.0.1:{metrics_port}")
    try:
        m.start()
        path = m.path / "m:1" / "model.gguf"
        with open(path, "rb") as f:
            f.seek(2 * MiB)
            first = f.read(MiB)
        assert first == source.read_bytes()[2 * MiB:3 * MiB]

        report = _status(m.cache)
        assert report["mount"] is not None and report["mount"]["pid"] == m.pid
        # (named as the mount names it: "m:1", or with the registry's host before it)
        (model,) = [r for r in report["models"] if r["name"].endswith("m:1")]
        # what readers asked for: the MiB read, and the kernel's readahead around it at most
        assert MiB <= model["read"] <= model["size"]
        assert MiB <= model["verified"] <= model["cached"] < model["size"]
        assert not model["sealed"]
        (source_counts,) = report["mount"]["sources"].values()
        assert source_counts["fetches"] > 0 and source_counts["bytes"] >= MiB
        assert source_counts["errors"] == 0 and source_counts["bad_chunks"] == 0

        samples = _metrics(metrics_port)
        label = (("model", model["name"]),)
        assert samples[("modelfs_model_read_bytes_total", label)] == model["read"]
        assert samples[("modelfs_model_size_bytes", label)] == model["size"]
        assert samples[("modelfs_model_sealed", label)] == 0
        (src,) = [k for k in samples if k[0] == "modelfs_source_fetches_total"]
        assert dict(src[1])["source"] == server.url
        assert samples[src] == source_counts["fetches"]
        assert samples[("modelfs_verification_failures_total", ())] == 0

        # the rest of the model: the counts follow, and it ends sealed
        assert sha256_file(path) == sha256_file(source)
        deadline = time.monotonic() + 20
        while not _status(m.cache)["models"][0]["sealed"] and time.monotonic() < deadline:
            time.sleep(0.1)
        after = _metrics(metrics_port)
        # every byte reached the reader by a READ of the mount or from pages pushed ahead
        assert after[("modelfs_model_read_bytes_total", label)] + \
            after[("modelfs_model_pushed_bytes_total", label)] >= model["size"]
        assert after[("modelfs_model_read_bytes_total", label)] > model["read"]
        assert after[("modelfs_model_verified_bytes", label)] == model["size"]
        assert after[("modelfs_model_sealed", label)] == 1

        table = subprocess.run(MODELFS + ["status", "--cache", str(m.cache)],
                               capture_output=True, text=True, timeout=30).stdout
        assert "READ" in table and f"mounted on {m.path}" in table

        # --watch refreshes until interrupted
        watcher = subprocess.Popen(MODELFS + ["status", "--cache", str(m.cache), "--watch",
                                              "0.2"], stdout=subprocess.PIPE, text=True)
        time.sleep(2.0)
        watcher.send_signal(signal.SIGINT)
        out, _ = watcher.communicate(timeout=10)
        assert watcher.returncode == 0
        assert out.count(f"mounted on {m.path}") >= 2

        m.unmount()
        gone = _status(m.cache)
        assert gone["mount"] is None and not (m.cache / "status.sock").exists()
        assert gone["models"][0]["sealed"] and gone["models"][0]["read"] is None
    finally:
        m.cleanup()
        server.stop()


def test_serve_metrics_count_requests(tmp_path):
    metrics_port = free_port()
    source, server = _served(tmp_path, MiB, "--metrics", f"127.0.0.1:{metrics_port}")
    try:
        ok = httpx.get(f"{server.url}/v2/library/m/manifests/1", timeout=10)
        assert ok.status_code == 200
        for _ in range(2):
            assert httpx.get(f"{server.url}/v2/library/nosuch/manifests/1",
                             timeout=10).status_code == 404
        samples = _metrics(metrics_port)
        get = ("method", "GET")
        assert samples[("modelfs_serve_requests_total", (get, ("status", "200")))] == 1
        assert samples[("modelfs_serve_requests_total", (get, ("status", "404")))] == 2
        assert samples[("modelfs_serve_sent_bytes_total", (get, ("status", "200")))] == \
            len(ok.content)
    finally:
        server.stop()


def test_metrics_address_is_checked(tmp_path):
    out = subprocess.run(MODELFS + ["mount", str(tmp_path / "mnt"), "--metrics", "nowhere"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "HOST:PORT" in out.stderr


async def test_a_failing_status_answer_does_not_end_the_mount(tmp_path):
    """The status socket is a convenience: a snapshot that raises (an index or stat error) is
    logged and the connection closed; the server, and the nursery it shares with the mount,
    go on answering."""
    import trio

    from modelfs.fs.status import query, serve_status

    class Flaky:
        calls = 0

        def snapshot(self):
            self.calls += 1
            if self.calls == 1:
                raise PermissionError(13, "Permission denied")
            return {"models": [], "ok": self.calls}

    status = Flaky()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_status, tmp_path, status)
        assert await trio.to_thread.run_sync(query, tmp_path) is None  # closed without an answer
        assert (await trio.to_thread.run_sync(query, tmp_path))["ok"] == 2
        nursery.cancel_scope.cancel()
    assert not (tmp_path / "status.sock").exists()
