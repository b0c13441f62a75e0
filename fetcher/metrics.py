"""Prometheus metrics (`--metrics HOST:PORT` on `mount` and `serve`), named `modelfs_...`.

A collector asks for a fresh snapshot on every scrape (fs/status.py for a mount; the
registry app's request counts for `serve`), so the page shows exactly what `modelfs status`
shows, and nothing is counted twice. The page is served by hypercorn in the caller's nursery,
with prometheus-client's ASGI app, so each scrape is generated on the trio thread, between
awaits, like every other reader of that state.

Mount metrics, per model (label `model`): size, cached, verified, read (asked for by
readers), fetched bytes, the fetch rate, the ETA of the rest, sealed; per source (label
`source`, scheme://host:port): chunk fetches, bytes, retries, errors, chunks that failed their
digest; in all: verification failures, evicted bytes.
"""

from __future__ import annotations

import functools

import hypercorn.config
import hypercorn.trio
import prometheus_client
import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_MODEL_GAUGES = [
    ("size", "size_bytes", "Bytes of the model (all its blobs)"),
    ("cached", "cached_bytes", "Bytes of the model on local disk"),
    ("verified", "verified_bytes", "Bytes of the model verified against their digests"),
    ("rate", "fetch_rate_bytes_per_second", "Bytes per second received for the model lately"),
]
_MODEL_COUNTERS = [
    ("read", "read_bytes", "Bytes of the model readers asked the mount for"),
    ("pushed", "pushed_bytes", "Bytes of the model put into the kernel's page cache ahead of "
     "readers (their reads of those pages never reach the mount)"),
    ("fetched", "fetched_bytes", "Bytes of the model received from sources"),
]
_SOURCE_COUNTERS = [
    ("fetches", "fetches", "Chunk fetches that succeeded"),
    ("bytes", "fetched_bytes", "Bytes received in those fetches"),
    ("retries", "retries", "Failed tries that were tried again"),
    ("errors", "errors", "Chunk fetches that failed for good"),
    ("bad_chunks", "bad_chunks", "Tries whose chunk failed its digest"),
]


class MountCollector:
    """The metrics of a mount, from `status.snapshot()` (fs/status.py) at each scrape."""

    def __init__(self, status):
        self._status = status

    def describe(self):
        return []  # (no fixed set: models come and go; nothing collected at registration)

    def collect(self):
        snap = self._status.snapshot()
        models = snap["models"]
        for key, name, doc in _MODEL_GAUGES:
            family = GaugeMetricFamily(f"modelfs_model_{name}", doc, labels=["model"])
            for m in models:
                family.add_metric([m["name"]], m[key])
            yield family
        for key, name, doc in _MODEL_COUNTERS:
            family = CounterMetricFamily(f"modelfs_model_{name}", doc, labels=["model"])
            for m in models:
                family.add_metric([m["name"]], m[key])
            yield family
        eta = GaugeMetricFamily("modelfs_model_eta_seconds",
                                "Seconds until the model is cached at the current rate",
                                labels=["model"])
        sealed = GaugeMetricFamily("modelfs_model_sealed",
                                   "1 once every blob of the model is sealed", labels=["model"])
        for m in models:
            if m["eta"] is not None:
                eta.add_metric([m["name"]], m["eta"])
            sealed.add_metric([m["name"]], 1.0 if m["sealed"] else 0.0)
        yield eta
        yield sealed
        sources = snap["sources"]
        for key, name, doc in _SOURCE_COUNTERS:
            family = CounterMetricFamily(f"modelfs_source_{name}", doc, labels=["source"])
            for label, counts in sources.items():
                family.add_metric([label], counts[key])
            yield family
        yield CounterMetricFamily("modelfs_verification_failures",
                                  "Chunks that failed their digest, all sources",
                                  value=sum(c["bad_chunks"] for c in sources.values()))
        yield CounterMetricFamily("modelfs_evicted_bytes", "Bytes evicted from the cache",
                                  value=snap["evicted_bytes"])


class ServeCollector:
    """The metrics of `modelfs serve`: requests by method and status, bytes sent."""

    def __init__(self, counts):
        self._counts = counts  # fetcher/server.py RequestCounts

    def describe(self):
        return []

    def collect(self):
        requests = CounterMetricFamily("modelfs_serve_requests", "HTTP requests answered",
                                       labels=["method", "status"])
        sent = CounterMetricFamily("modelfs_serve_sent_bytes", "Body bytes sent",
                                   labels=["method", "status"])
        for (method, status), (n, nbytes) in sorted(self._counts.by_answer.items()):
            requests.add_metric([method, status], n)
            sent.add_metric([method, status], nbytes)
        yield requests
        yield sent


def _config(host: str, port: int) -> hypercorn.config.Config:
    config = hypercorn.config.Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 1.0
    return config


async def serve_metrics(listen: tuple[str, int], collector, *,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve `collector`'s metrics on http://HOST:PORT/metrics (and /) until cancelled;
    `task_status.started(port)` once listening (the port chosen when 0 was asked)."""
    registry = prometheus_client.CollectorRegistry(auto_describe=False)
    registry.register(collector)
    page = prometheus_client.make_asgi_app(registry)

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":  # (the page app knows only http)
            while True:
                message = await receive()
                kind = message["type"].rsplit(".", 1)[-1]  # startup / shutdown
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        elif scope["type"] == "http":
            await page(scope, receive, send)

    host, port = listen
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(functools.partial(
            hypercorn.trio.serve, app, _config(host, port), mode="asgi"))
        task_status.started(int(binds[0].rsplit(":", 1)[1]))
