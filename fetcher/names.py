"""Model names as Ollama parses them (protocol.md §1.1).

`[scheme://][host/][namespace/]model[:tag]` with defaults host `registry.ollama.ai`, namespace
`library`, tag `latest`. Every part is validated (characters, lengths) before the name is used for
a URL or a path, so no name can escape the cache or the mount.

A name is what a model is called; where it is fetched from is not part of it. `--registry URL`
only says where the default host's models come from: `Registry.name` is the one place that maps
a name to its origin URL, so `tiny` read from `http://127.0.0.1:8080` is still
`registry.ollama.ai/library/tiny:latest` in the cache and on the mount (Ollama's own names and
paths), and the same model served from another port is the same model.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse

from modelfs.cache.errors import InvalidName

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
DEFAULT_SCHEME = "https"
SCHEMES = ("http", "https")
# host 350 + namespace/model/tag 80 each + three separators (upstream MaxNameLength).
MAX_NAME_LENGTH = 593

_LIMITS = {"host": 350, "namespace": 80, "model": 80, "tag": 80}
# First character [A-Za-z0-9_]; later characters add '-', '.' (not in the namespace) and ':'
# (host only, for host:port).
_PART_RE = {
    "host": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]*"),
    "namespace": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*"),
    "model": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*"),
    "tag": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*"),
}


def _shown(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


def validate_part(kind: str, value: str) -> str:
    """Check one part of a name; return it unchanged or raise InvalidName."""
    if not value:
        raise InvalidName(f"invalid model name: empty {kind}")
    if len(value.encode("utf-8", "surrogateescape")) > _LIMITS[kind]:
        raise InvalidName(f"invalid model name: {kind} longer than {_LIMITS[kind]} bytes")
    if not _PART_RE[kind].fullmatch(value):
        raise InvalidName(f"invalid model name: bad character in {kind} {_shown(value)}")
    return value


@dataclasses.dataclass(frozen=True)
class ModelName:
    host: str
    namespace: str
    model: str
    tag: str
    # `scheme://netloc` the model is fetched from, set by Registry.name; not part of the name
    # (equality and hashing ignore it). None: https://<host>.
    origin: str | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        for kind in ("host", "namespace", "model", "tag"):
            validate_part(kind, getattr(self, kind))
        if self.origin is not None and self.origin.split("://", 1)[0] not in SCHEMES:
            raise InvalidName(f"unsupported scheme in {self.origin!r} (use http or https)")

    @property
    def base_url(self) -> str:
        return self.origin or f"{DEFAULT_SCHEME}://{self.host}"

    @property
    def scheme(self) -> str:
        return self.base_url.split("://", 1)[0]

    @property
    def store_parts(self) -> tuple[str, str, str, str]:
        """(host, namespace, model, tag): the manifest's path below `manifests/`."""
        return (self.host, self.namespace, self.model, self.tag)

    def __str__(self) -> str:
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    def short(self) -> str:
        """The shortest form that parses back to this name (as `ollama list` shows it)."""
        if self.host != DEFAULT_HOST:
            return str(self)
        if self.namespace != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"


@dataclasses.dataclass(frozen=True)
class Registry:
    """Where the default host's models are fetched from: `--registry URL` / `MODELFS_REGISTRY`
    (default https://registry.ollama.ai). Names keep the default host whatever this says."""

    netloc: str = DEFAULT_HOST
    scheme: str = DEFAULT_SCHEME

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.netloc}"

    def name(self, host: str, namespace: str, model: str, tag: str,
             scheme: str | None = None) -> ModelName:
        """The name with the origin it is fetched from: the default host's from this registry;
        the registry's own netloc typed as a host (`127.0.0.1:8080/ns/m`) with its scheme too;
        any other host from itself, over https unless the name said `http://`."""
        netloc = self.netloc if host == DEFAULT_HOST else host
        if scheme is None:
            scheme = self.scheme if netloc == self.netloc else DEFAULT_SCHEME
        return ModelName(host, namespace, model, tag, f"{scheme}://{netloc}")

    @classmethod
    def from_url(cls, url: str | None) -> "Registry":
        if not url:
            return cls()
        if "://" not in url:
            url = "https://" + url
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in SCHEMES:
            raise InvalidName(f"unsupported registry scheme in {url!r} (use http or https)")
        if parsed.path not in ("", "/") or parsed.query or parsed.fragment or parsed.username:
            raise InvalidName(f"registry URL must be scheme://host[:port], got {url!r}")
        return cls(netloc=validate_part("host", parsed.netloc), scheme=parsed.scheme)


def parse_name(text: str, registry: Registry = Registry()) -> ModelName:
    """Parse a model name the way Ollama does, filling defaults from `registry`."""
    if not isinstance(text, str) or not text:
        raise InvalidName("invalid model name: empty")
    if len(text) > MAX_NAME_LENGTH + len("https://"):
        raise InvalidName(f"invalid model name: longer than {MAX_NAME_LENGTH} bytes")
    scheme = None
    if "://" in text:
        scheme, text = text.split("://", 1)
        if scheme not in SCHEMES:
            raise InvalidName(f"unsupported scheme {scheme!r} in model name")
    tag = DEFAULT_TAG
    colon, slash = text.rfind(":"), text.rfind("/")
    if colon > slash:
        text, tag = text[:colon], text[colon + 1:]
    parts = text.split("/")
    if len(parts) > 3:
        # Upstream folds the rest into the host, where '/' is not allowed: same verdict.
        raise InvalidName(f"invalid model name: too many '/' in {_shown(text)}")
    model = parts[-1]
    namespace = parts[-2] if len(parts) >= 2 else DEFAULT_NAMESPACE
    host = parts[0] if len(parts) == 3 else DEFAULT_HOST
    return registry.name(host, namespace, model, tag, scheme)
