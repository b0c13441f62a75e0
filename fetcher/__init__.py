"""The registry wire protocol, both ends: model names, manifests, chunk lists, range GETs with
retries, the pull driver, the mount's read path (resolver, materializer, fetch scheduler,
prefetch), and the `modelfs serve` registry and its static export. Knows nothing of FUSE."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("modelfs")
except _metadata.PackageNotFoundError:  # running from a checkout that is not installed
    __version__ = "0.0.0"
