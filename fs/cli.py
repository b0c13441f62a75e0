"""The `modelfs` command line.

Exit codes: 0 success; 1 a modelfs error (one line on stderr, no traceback: bad names, unknown
models, unreachable registries, verification failures); 2 bad usage (options that do not fit
together, a missing directory); 130 interrupted.
`MODELFS_DEBUG=1` adds tracebacks.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import pathlib
import sys
import time

import trio

from modelfs.cache.chunks import DEFAULT_CHUNK_SIZE, MAX_CHUNK_BYTES
from modelfs.cache.units import FETCH_UNIT
from modelfs.cache.errors import ModelfsError
from modelfs.fetcher import __version__

from .ops import PREFETCH_MODES
from .progress import BarProgress, LogProgress
from .sizes import format_size, size_arg, size_or_zero_arg

log = logging.getLogger("modelfs")


def default_cache_dir() -> pathlib.Path:
    if os.environ.get("MODELFS_CACHE"):
        return pathlib.Path(os.environ["MODELFS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return pathlib.Path(base) / "modelfs"


def default_models_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("OLLAMA_MODELS") or os.path.expanduser("~/.ollama/models"))


class UsageError(ModelfsError):
    pass


# -- import ---------------------------------------------------------------------------------

def _text_arg(value: str | None) -> str | None:
    """Text given inline, or `@path` to read it from a file."""
    if value is None or not value.startswith("@"):
        return value
    try:
        return pathlib.Path(value[1:]).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {value[1:]}: {exc.strerror}") from None


def cmd_import(args) -> int:
    from modelfs.cache.importer import import_gguf
    from modelfs.cache.store import ModelsDir
    from modelfs.fetcher.names import Registry, parse_name

    registry = Registry.from_url(args.registry)
    name = parse_name(args.name, registry)
    params = _text_arg(args.params)
    if params is not None:
        try:
            params = json.loads(params)
        except ValueError as exc:
            raise UsageError(f"--params is not valid JSON: {exc}") from None
        if not isinstance(params, dict):
            raise UsageError("--params must be a JSON object")
    models = ModelsDir(args.models).create()
    result = import_gguf(args.file, name.store_parts, models, template=_text_arg(args.template),
                         system=_text_arg(args.system), params=params,
                         license=_text_arg(args.license))
    print(f"imported {name.short()} into {models.root}")
    for layer in result.layers:
        print(f"  {layer.media_type:45s} {layer.digest}  {layer.size}")
    return 0


# -- serve ----------------------------------------------------------------------------------

def _listen_arg(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def cmd_serve(args) -> int:
    from modelfs.fetcher import server

    from modelfs.fetcher.groups import first_error

    host, port = args.listen
    if not args.models.is_dir():
        raise UsageError(f"models directory {args.models} does not exist")
    if args.export is not None:
        from modelfs.fetcher.export import export_tree

        stats = trio.run(functools.partial(
            export_tree, args.models, args.export, chunk_size=args.chunk_size,
            state_dir=args.state_dir))
        print(f"exported {stats.manifests} manifests and {stats.blobs} blobs of {args.models} "
              f"as a static registry tree in {args.export}")
        return 0
    if not server.MIN_CHUNK_SIZE <= args.chunk_size <= MAX_CHUNK_BYTES:
        raise UsageError(f"--chunk-size must be between {server.MIN_CHUNK_SIZE >> 10}K and "
                         f"{MAX_CHUNK_BYTES >> 20}M")

    async def main():
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(lambda task_status: server.serve(
                args.models, host=host, port=port, chunk_size=args.chunk_size,
                state_dir=args.state_dir, metrics=args.metrics, task_status=task_status))
            print(f"serving {args.models} on http://{host}:{bound}", flush=True)

    try:
        with first_error():
            trio.run(main)
    except ValueError as exc:  # a bad state dir or chunk size, found by serve() itself
        raise UsageError(str(exc)) from None
    return 0


# -- pull -----------------------------------------------------------------------------------

def cmd_pull(args) -> int:
    from modelfs.cache.blobcache import BlobCache
    from modelfs.cache.store import ModelsDir
    from modelfs.fetcher.client import ClientConfig, RegistryClient
    from modelfs.fetcher.names import Registry, parse_name
    from modelfs.fetcher.pull import pull

    registry = Registry.from_url(args.registry)
    name = parse_name(args.name, registry)
    if args.chunk_size > MAX_CHUNK_BYTES:
        raise UsageError(f"--chunk-size must be at most {MAX_CHUNK_BYTES >> 20}M")
    _check_fetch_unit(args)
    label = f"pulling {name.short()}"
    progress = BarProgress(label) if sys.stderr.isatty() else LogProgress(label)
    started = time.monotonic()

    async def main():
        cache = BlobCache(args.cache, cap=args.cache_max, min_free=args.min_free)
        try:
            config = ClientConfig.from_env(max_connections=max(args.concurrency, 4),
                                           fetch_unit=args.fetch_unit)
            async with RegistryClient(config) as client:
                return await pull(name, client, cache, concurrency=args.concurrency,
                                  chunk_size=args.chunk_size, progress=progress,
                                  on_start=progress.begin)
        finally:
            cache.close()

    try:
        result = trio.run(main)
    finally:
        progress.close()
    elapsed = time.monotonic() - started
    print(f"pulled {name.short()}: {format_size(result.total_bytes)} verified and sealed "
          f"({format_size(result.fetched_bytes)} fetched in {result.fetched_chunks} chunks, "
          f"{format_size(result.cached_bytes)} already cached) in {elapsed:.1f}s")
    if result.unverified_layers:
        print(f"({result.unverified_layers} layer(s) came without chunk digests and were "
              f"verified as whole blobs)")
    print(f"manifest: {ModelsDir(args.cache).manifest_path(name.store_parts)}")
    return 0


# -- mount ----------------------------------------------------------------------------------

def cmd_mount(args) -> int:
    from modelfs.fetcher.names import Registry, parse_name

    from .mount import MountOptions, run_background, run_foreground

    registry = Registry.from_url(args.registry)
    for text in args.model:
        parse_name(text, registry)  # refuse bad names before anything is mounted
    _check_fetch_unit(args)
    opts = MountOptions(mountpoint=args.mountpoint.resolve(), cache=args.cache.resolve(),
                        registry=registry, models=list(args.model),
                        read_timeout=args.read_timeout, allow_other=args.allow_other,
                        max_fetches=args.max_fetches, max_inflight=args.max_inflight,
                        prefetch=args.prefetch, readahead=args.readahead,
                        cache_max=args.cache_max, min_free=args.min_free,
                        fetch_unit=args.fetch_unit, metrics=args.metrics,
                        source=args.registry)
    if args.foreground:
        return run_foreground(opts)
    return run_background(opts, opts.cache / "mount.log")


def cmd_unmount(args) -> int:
    from .mount import unmount

    unmount(args.mountpoint.resolve(), lazy=args.lazy)
    print(f"unmounted {args.mountpoint}")
    return 0


# -- status and evict ------------------------------------------------------------------------

def cmd_status(args) -> int:
    from .statusview import render, report, watch

    if not (args.cache / "index.sqlite").exists() and not (args.cache / "manifests").is_dir():
        raise UsageError(f"{args.cache} is not a modelfs cache")
    if args.watch is not None:
        watch(args.cache, args.watch)
    elif args.json:
        print(json.dumps(report(args.cache), indent=2))
    else:
        print(render(report(args.cache)))
    return 0


def cmd_evict(args) -> int:
    from modelfs.cache.blobcache import BlobCache
    from modelfs.cache.inventory import evict_blobs, inventory
    from modelfs.fetcher.names import Registry, parse_name

    if bool(args.name) == args.all:
        raise UsageError("name a model to evict, or use --all")
    models, _ = inventory(args.cache)
    if args.all:
        chosen = models
    else:
        name = parse_name(args.name, Registry.from_url(args.registry))
        chosen = [m for m in models if m.parts == name.store_parts]
        if not chosen:
            raise UsageError(f"{args.name} is not in the cache {args.cache}")
    keep = {b.digest for m in models if m not in chosen for b in m.blobs}  # shared blobs
    cache = BlobCache(args.cache)  # refused (CacheBusy) while a mount or a pull uses it
    try:
        freed = evict_blobs(cache, sorted({b.digest for m in chosen for b in m.blobs} - keep))
        for m in chosen:
            cache.store.manifest_path(m.parts).unlink(missing_ok=True)  # no longer complete
    finally:
        cache.close()
    print(f"evicted {len(chosen)} model(s), {format_size(freed)} freed")
    return 0


# -- main -----------------------------------------------------------------------------------

def _metrics_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics", type=_listen_arg, default=None, metavar="HOST:PORT",
                   help="serve Prometheus metrics (modelfs_...) on http://HOST:PORT/metrics")


def _cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", type=pathlib.Path, default=default_cache_dir(),
                   help="cache directory (default $MODELFS_CACHE, else $XDG_CACHE_HOME/modelfs "
                   "or ~/.cache/modelfs)")


def _budget_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-max", type=size_arg, default=None, metavar="SIZE",
                   help="keep the cache's disk use under SIZE, evicting least recently used "
                   "chunks (e.g. 20G)")
    p.add_argument("--min-free", type=size_arg, default=None, metavar="SIZE",
                   help="keep at least SIZE free on the cache's filesystem, evicting sooner")


def _fetch_unit_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fetch-unit", type=size_or_zero_arg, default=FETCH_UNIT, metavar="SIZE",
                   help="the registry's chunks smaller than this are fetched together, in "
                   "range requests of up to SIZE, each chunk still verified on its own "
                   "(default 4M; 0: one request per chunk)")


def _check_fetch_unit(args) -> None:
    if args.fetch_unit and not 64 << 10 <= args.fetch_unit <= MAX_CHUNK_BYTES:
        raise UsageError(f"--fetch-unit must be 0 or between 64K and {MAX_CHUNK_BYTES >> 20}M")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelfs", description="Mount models from an Ollama-compatible registry as lazily "
        "materialized, verified files.")
    parser.add_argument("--version", action="version", version=f"modelfs {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    registry_help = ("registry for names without a host, e.g. http://127.0.0.1:8080 "
                     "(default $MODELFS_REGISTRY or https://registry.ollama.ai)")

    p = sub.add_parser("import", help="make a model from a GGUF file in an Ollama models dir")
    p.add_argument("file", type=pathlib.Path, help="the GGUF file")
    p.add_argument("name", help="model name, e.g. tiny:latest or myns/tiny:q4")
    p.add_argument("--models", type=pathlib.Path, default=default_models_dir(),
                   help="models directory (default $OLLAMA_MODELS or ~/.ollama/models)")
    p.add_argument("--registry", default=os.environ.get("MODELFS_REGISTRY"), help=registry_help)
    for layer in ("template", "system", "license"):
        p.add_argument(f"--{layer}", help=f"{layer} text, or @FILE")
    p.add_argument("--params", help="runtime parameters as a JSON object, or @FILE")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("serve", help="serve an Ollama models dir as a registry")
    p.add_argument("--models", type=pathlib.Path, default=default_models_dir(),
                   help="models directory (default $OLLAMA_MODELS or ~/.ollama/models)")
    p.add_argument("--listen", type=_listen_arg, default=("127.0.0.1", 11435),
                   metavar="HOST:PORT", help="address to listen on (default 127.0.0.1:11435; "
                   "port 0 picks a free one)")
    p.add_argument("--chunk-size", type=size_arg, default=DEFAULT_CHUNK_SIZE, metavar="SIZE",
                   help="chunksums chunk size (default 8M)")
    p.add_argument("--state-dir", type=pathlib.Path, default=None,
                   help="where computed chunk lists are remembered (outside the models dir)")
    _metrics_arg(p)
    p.add_argument("--export", type=pathlib.Path, default=None, metavar="DIR",
                   help="instead of serving, write the models dir as a static registry tree "
                   "(v2/<ns>/<model>/manifests|blobs|chunksums/...) for any web server or CDN")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("pull", help="fetch every layer of a model into the cache, verified")
    p.add_argument("name", help="model name, e.g. qwen3:0.6b")
    p.add_argument("--registry", default=os.environ.get("MODELFS_REGISTRY"), help=registry_help)
    p.add_argument("--cache", type=pathlib.Path, default=default_cache_dir(),
                   help="cache directory, an Ollama models dir (default $MODELFS_CACHE or "
                   "~/.cache/modelfs)")
    p.add_argument("--concurrency", type=int, default=4,
                   help="chunks in flight (default 4: enough to fill a fast link; more help on "
                   "high-latency ones)")
    p.add_argument("--chunk-size", type=size_arg, default=DEFAULT_CHUNK_SIZE, metavar="SIZE",
                   help="range size when the registry has no chunk list (default 8M)")
    _fetch_unit_arg(p)
    _budget_args(p)
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("mount", help="mount the registry's models as lazily fetched files")
    p.add_argument("mountpoint", type=pathlib.Path)
    p.add_argument("--registry", default=os.environ.get("MODELFS_REGISTRY"), help=registry_help)
    _cache_arg(p)
    p.add_argument("--model", action="append", default=[], metavar="NAME",
                   help="resolve this model at mount time and list it (repeatable)")
    p.add_argument("--foreground", "-f", action="store_true",
                   help="stay attached and log to stderr (default: run in the background and "
                   "log to <cache>/mount.log)")
    p.add_argument("--read-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="a read whose fetches made no progress for this long fails with EIO "
                   "(default 60); a download that moves is waited for, however long it takes")
    p.add_argument("--max-fetches", type=int, default=4, metavar="N",
                   help="chunk fetches in flight at most (default 4: enough to fill a fast link; "
                   "more help on high-latency ones)")
    p.add_argument("--max-inflight", type=size_arg, default=64 << 20, metavar="SIZE",
                   help="bytes of chunk data in flight at most, all files together "
                   "(default 64M): bounds the daemon's memory, and the verified chunks not yet "
                   "recorded in the cache index (what a crash makes it fetch again)")
    p.add_argument("--prefetch", choices=PREFETCH_MODES, default="auto",
                   help="auto: a window ahead of sequential readers, plus the rest of an open "
                   "model in the background; sequential: the window only; none: only what is "
                   "read (default auto)")
    p.add_argument("--readahead", type=size_arg, default=4 << 20, metavar="SIZE",
                   help="the kernel's readahead window for the mount (default 4M; root only): "
                   "large sequential reads and mmap arrive as 1 MiB requests")
    p.add_argument("--allow-other", action="store_true",
                   help="let other users read the mount (e.g. an ollama service user)")
    _metrics_arg(p)
    _fetch_unit_arg(p)
    _budget_args(p)
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("status", help="what the cache holds, model by model (and, beside a "
                       "live mount, what it reads and fetches)")
    _cache_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--watch", type=float, nargs="?", const=1.0, default=None,
                   metavar="SECONDS", help="refresh every SECONDS (default 1) until Ctrl-C")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("evict", help="drop a model's cached data (refused while mounted)")
    p.add_argument("name", nargs="?", help="model name")
    p.add_argument("--all", action="store_true", help="drop everything")
    _cache_arg(p)
    p.add_argument("--registry", default=os.environ.get("MODELFS_REGISTRY"), help=registry_help)
    p.set_defaults(func=cmd_evict)

    p = sub.add_parser("unmount", help="unmount a modelfs mount and wait for its daemon")
    p.add_argument("mountpoint", type=pathlib.Path)
    p.add_argument("--lazy", "-z", action="store_true", help="detach even if files are open")
    p.set_defaults(func=cmd_unmount)
    parser.commands = sub.choices  # (the mount helper form is told apart by them)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if argv and argv[0] not in parser.commands and not argv[0].startswith("-"):
        from .mountopts import mount_helper
        return mount_helper(parser, argv, run)
    return run(parser.parse_args(argv))


def run(args) -> int:
    level = logging.WARNING - 10 * args.verbose
    if args.command == "serve" or (args.command == "mount" and args.foreground):
        level = min(level, logging.INFO)  # one line per request / what the mount does
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("httpx").setLevel(max(level, logging.WARNING))  # our own logs say more
    debug = bool(os.environ.get("MODELFS_DEBUG"))
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("modelfs: interrupted (verified chunks are kept in the cache)", file=sys.stderr)
        return 130
    except UsageError as exc:
        print(f"modelfs: error: {exc}", file=sys.stderr)
        return 2
    except ModelfsError as exc:
        if debug:
            raise
        print(f"modelfs: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if debug:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"modelfs: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
