"""Model names to manifests for the mount: from the registry on first use, remembered locally.

- A manifest fetched for the mount is saved under `<cache>/resolved/<host>/<ns>/<model>/<tag>`
  (not `manifests/`: Ollama would take a manifest there as a complete model). Once every blob
  of the model is sealed it is also written to `manifests/`.
- When the registry cannot be reached, the saved copy (or a complete model in `manifests/`)
  is used, so cached models stay readable offline and after a remount.
- Unknown models are remembered for `negative_ttl` seconds, so repeated lookups of a name that
  does not exist answer at once without asking the registry again.
- Lookups of one name are single-flight.
- The models the cache holds (`load_cached`) are known from the start of a mount, with the
  manifest the cache has for them: a remount shows them at once, offline too. (The tag is
  not asked of the registry again: `modelfs pull` moves it on.)

Concurrency contract: trio thread only; manifests (kilobytes) are read on the loop, written
(with fsync) in a thread.
"""

from __future__ import annotations

import logging

import trio

from modelfs.cache.blobcache import BlobCache
from modelfs.cache.store import ModelsDir
from modelfs.cache.errors import ModelfsError

from .client import RegistryClient
from .errors import BadManifest, NotFound
from .manifest import Manifest, parse_manifest
from .names import ModelName, Registry

log = logging.getLogger(__name__)


class ModelResolver:
    def __init__(self, client: RegistryClient, cache: BlobCache, *, negative_ttl: float = 30.0):
        self._client = client
        self._cache = cache
        self._saved = ModelsDir(cache.root / "resolved")
        self._negative_ttl = negative_ttl
        self._known: dict[ModelName, Manifest] = {}
        self._missing: dict[ModelName, tuple[float, NotFound]] = {}
        self._flights: dict[ModelName, trio.Event] = {}

    def known(self) -> dict[ModelName, Manifest]:
        return dict(self._known)

    def load_cached(self, registry: Registry) -> dict[ModelName, Manifest]:
        """Know every model the cache holds a manifest of (complete ones in `manifests/`,
        those a mount resolved in `resolved/`); the names are fetched through `registry`."""
        for store in (self._cache.store, self._saved):
            for parts in store.list_manifests():
                try:
                    name = registry.name(*parts)
                except ModelfsError as exc:  # not a name: a stray directory in the cache
                    log.warning("ignoring manifests/%s: %s", "/".join(parts), exc)
                    continue
                if name not in self._known:
                    manifest = self._local(name)
                    if manifest is not None:
                        self._known[name] = manifest
        return dict(self._known)

    async def resolve(self, name: ModelName) -> Manifest:
        """The manifest of `name`, or NotFound / the registry's error."""
        while True:
            if name in self._known:
                return self._known[name]
            missing = self._missing.get(name)
            if missing and trio.current_time() < missing[0]:
                raise missing[1]
            flight = self._flights.get(name)
            if flight is None:
                break
            await flight.wait()
            if name not in self._known and name not in self._missing:
                break  # that attempt failed for another reason: try ourselves
        self._flights[name] = flight = trio.Event()
        try:
            manifest = await self._fetch(name)
            self._known[name] = manifest
            self._missing.pop(name, None)
            return manifest
        except NotFound as exc:
            now = trio.current_time()
            for old in [n for n, (until, _) in self._missing.items() if until < now]:
                del self._missing[old]  # remembered for a while, not forever
            self._missing[name] = (now + self._negative_ttl, exc)
            raise
        finally:
            del self._flights[name]
            flight.set()

    async def _fetch(self, name: ModelName) -> Manifest:
        try:
            manifest = await self._client.fetch_manifest(name)
        except ModelfsError as exc:
            if isinstance(exc, (NotFound, BadManifest)):
                raise
            local = self._local(name)
            if local is None:
                raise
            log.warning("registry unavailable for %s (%s); using the manifest saved locally",
                        name, exc)
            return local
        await trio.to_thread.run_sync(self._saved.write_manifest, name.store_parts, manifest.raw)
        return manifest

    def _local(self, name: ModelName) -> Manifest | None:
        for store in (self._cache.store, self._saved):
            raw = store.read_manifest(name.store_parts)
            if raw is not None:
                try:
                    return parse_manifest(raw)
                except BadManifest as exc:
                    log.warning("saved manifest of %s is unusable: %s", name, exc)
        return None

    async def promote_if_complete(self, name: ModelName) -> bool:
        """Write the manifest into `manifests/` once all its blobs are sealed (so the cache
        stays a valid Ollama models directory)."""
        manifest = self._known.get(name)
        if manifest is None:
            return False
        if not all(self._cache.is_sealed(b.digest, b.size) for b in manifest.blobs()):
            return False
        if self._cache.store.read_manifest(name.store_parts) != manifest.raw:
            await trio.to_thread.run_sync(self._cache.store.write_manifest, name.store_parts,
                                          manifest.raw)
            log.info("all blobs of %s are sealed; manifest written to manifests/", name)
        return True
