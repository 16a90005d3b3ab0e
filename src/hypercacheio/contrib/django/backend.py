"""The Django cache backend: Django's ``BaseCache`` contract translated onto ``Cache``.

Only translation lives here: Django's keys (prefix, version, key function, memcached-key
warnings), Django's timeouts (``DEFAULT_TIMEOUT``, None = forever, <= 0 = do not store) and
Django's errors (ValueError for ``incr`` on a missing key, the pickling error itself for an
unpicklable value). Storage, expiry, culling, L1 coherence and cluster roles are the engine's.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

from django.core.cache.backends.base import (
    DEFAULT_TIMEOUT,
    BaseCache,
    InvalidCacheKey,
    default_key_func,
)
from django.core.exceptions import ImproperlyConfigured

from ...cache import Cache
from ...codec import MAX_KEY_BYTES
from ...config import Settings
from ...errors import ConfigError, InvalidValueError
from ...lock import DEFAULT_BLOCKING_TIMEOUT, Lock
from .. import fit_engine_key

# Django's memcached portability rule, checked here with one regex so that a valid key
# costs no generator; a key that breaks it goes through ``validate_key`` for the warning.
_MEMCACHE_MAX_KEY_LENGTH = 250
_MEMCACHE_BAD_CHARS = re.compile(r"[\x00-\x20\x7f]")
_KEY_MEMO_SIZE = 4096  # keys whose engine key is remembered per backend object

# Settings that Django's own CACHES keys express; OPTIONS may not set them a second time.
_DJANGO_OWNED = {
    "directory": "LOCATION",
    "prefix": "KEY_PREFIX",
    "default_ttl": "TIMEOUT",
}
_ENGINE_FIELDS = frozenset(f.name for f in dataclasses.fields(Settings))

# One engine per distinct configuration and process. Django builds a backend object per
# alias and per thread (and again after override_settings); they all share this Cache, so
# its L1 and its per-thread connections are not rebuilt each time.
_engines: dict[Settings, Cache] = {}
_engines_lock = threading.Lock()


def engine_for(settings: Settings) -> Cache:
    """The process-wide ``Cache`` for these settings (opened on first use)."""
    with _engines_lock:
        engine = _engines.get(settings)
        if engine is None:
            engine = _engines[settings] = Cache(settings=settings)
        return engine


def settings_from_caches_entry(location: str | None, params: Mapping[str, Any]) -> Settings:
    """Engine settings for one ``CACHES`` entry.

    ``LOCATION`` is the storage directory; ``OPTIONS`` holds engine settings by their
    keyword names (``l1_max_items``, ``max_bytes``, ``role``, ...; upper case accepted).
    ``MAX_ENTRIES`` limits the entry count only when given explicitly: Django's implicit
    default of 300 would make a shared, persistent store evict almost everything.
    Settings not given here come from ``HYPERCACHEIO_*`` variables, as for the CLI.
    """
    options = {str(k).lower(): v for k, v in (params.get("OPTIONS") or {}).items()}
    given: dict[str, Any] = {"prefix": "", "default_ttl": None, "max_entries": None}
    if "max_entries" in params:
        options.setdefault("max_entries", params["max_entries"])
    if "cull_frequency" in params:
        options.setdefault("cull_frequency", params["cull_frequency"])
    for name, value in options.items():
        if name in _DJANGO_OWNED:
            raise ImproperlyConfigured(
                f"CACHES OPTIONS must not set {name!r}: use the entry's "
                f"{_DJANGO_OWNED[name]!r} instead")
        if name not in _ENGINE_FIELDS:
            known = ", ".join(sorted(_ENGINE_FIELDS - set(_DJANGO_OWNED)))
            raise ImproperlyConfigured(
                f"unknown hypercacheio option {name!r} in CACHES OPTIONS; known options: "
                f"{known}")
        given[name] = value
    if location:
        given["directory"] = str(location)
    try:
        return Settings.from_env(**given)
    except ConfigError as exc:
        raise ImproperlyConfigured(f"hypercacheio cache settings: {exc}") from exc


def _unpickling_error(exc: InvalidValueError) -> BaseException:
    """The pickling error itself: Django's contract raises it unchanged."""
    return exc.__cause__ if isinstance(exc.__cause__, Exception) else exc


class HyperCacheIOCache(BaseCache):
    """``CACHES = {"default": {"BACKEND": "hypercacheio.contrib.django.HyperCacheIOCache",
    "LOCATION": "/var/lib/myapp/hypercacheio"}}``: one store shared by every worker process.
    """

    def __init__(self, location: str | None, params: dict[str, Any]) -> None:
        self._memo: dict[Any, str] = {}
        super().__init__(params)
        self.settings = settings_from_caches_entry(location, params)
        self._cache = engine_for(self.settings)
        self._engine_get = self._cache.get
        cls = type(self)
        # A subclass that customises make_key or validate_key always goes through them.
        self._custom_keys = (cls.make_key is not BaseCache.make_key
                             or cls.validate_key is not BaseCache.validate_key)

    # The memo maps a key (default version) to its engine key. Anything that changes how
    # keys are made empties it, so it can never hand out a key made the old way.
    @property
    def key_func(self) -> Any:
        return self._key_func

    @key_func.setter
    def key_func(self, func: Any) -> None:
        self._key_func = func
        self._memo.clear()

    @property
    def key_prefix(self) -> str:
        return self._key_prefix

    @key_prefix.setter
    def key_prefix(self, prefix: str) -> None:
        self._key_prefix = prefix
        self._memo.clear()

    @property
    def version(self) -> Any:
        return self._version

    @version.setter
    def version(self, version: Any) -> None:
        self._version = version
        self._memo.clear()

    @property
    def engine(self) -> Cache:
        """The ``hypercacheio.Cache`` behind this backend (shared by equal configurations)."""
        return self._cache

    # ---- translation helpers ----------------------------------------------------------

    def _key(self, key: Any, version: int | None) -> str:
        """make_key + validate_key (Django's warnings), then a key the engine accepts."""
        memoizable = version is None and not self._custom_keys and type(key) is str
        if memoizable:
            try:
                return self._memo[key]
            except KeyError:
                pass
        warned = False
        if self._custom_keys:
            full = self.make_and_validate_key(key, version=version)
        else:
            if version is None:
                version = self.version
            key_func = self.key_func
            if key_func is default_key_func:
                full = "%s:%s:%s" % (self.key_prefix, version, key)  # noqa: UP031 (Django's form)
            else:
                full = key_func(key, self.key_prefix, version)
            if type(full) is str and (len(full) > _MEMCACHE_MAX_KEY_LENGTH
                                      or _MEMCACHE_BAD_CHARS.search(full)):
                self.validate_key(full)
                warned = True
        if type(full) is not str or not full:
            raise InvalidCacheKey(
                f"cache keys must be non-empty strings; the key function made {full!r}")
        if len(full) > MAX_KEY_BYTES // 4 or "\0" in full:  # NUL: the engine's, internal
            full = fit_engine_key(full)
        # Remember keys that need no warning (a warned key must warn again next time).
        if memoizable and not warned:
            memo = self._memo
            if len(memo) >= _KEY_MEMO_SIZE:
                memo.clear()
            memo[key] = full
        return full

    def _ttl(self, timeout: Any) -> Any:
        """Django's timeout as the engine's ttl: None = forever, 0 = do not store."""
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.default_timeout
        if timeout is None or isinstance(timeout, timedelta):
            return timeout
        return timeout if timeout > 0 else 0

    # ---- the BaseCache contract ---------------------------------------------------------

    def get(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        if version is None:  # the hot path: one dict lookup, then the engine's L1
            try:
                full = self._memo[key]
            except (KeyError, TypeError):
                full = self._key(key, None)
        else:
            full = self._key(key, version)
        return self._engine_get(full, default)

    def set(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT,
            version: int | None = None) -> None:
        full = self._key(key, version)
        try:
            self._cache.set(full, value, self._ttl(timeout))
        except InvalidValueError as exc:
            raise _unpickling_error(exc) from None

    def add(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT,
            version: int | None = None) -> bool:
        full = self._key(key, version)
        ttl = self._ttl(timeout)
        if ttl == 0:  # Django: "added" (and gone at once) when the key was not there
            return not self._cache.has(full)
        try:
            return self._cache.add(full, value, ttl)
        except InvalidValueError as exc:
            raise _unpickling_error(exc) from None

    def touch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT,
              version: int | None = None) -> bool:
        return self._cache.touch(self._key(key, version), self._ttl(timeout))

    def delete(self, key: Any, version: int | None = None) -> bool:
        return self._cache.delete(self._key(key, version))

    def has_key(self, key: Any, version: int | None = None) -> bool:
        return self._cache.has(self._key(key, version))

    def incr(self, key: Any, delta: Any = 1, version: int | None = None) -> Any:
        """Atomic across processes for int values and int deltas; ValueError if missing."""
        if type(delta) is not int:  # e.g. a float delta: Django's generic read-add-write
            return super().incr(key, delta, version=version)
        full = self._key(key, version)
        try:
            return self._cache.incr(full, delta, create=False)
        except KeyError:
            raise ValueError(f"Key '{key}' not found") from None

    def decr(self, key: Any, delta: Any = 1, version: int | None = None) -> Any:
        return self.incr(key, -delta, version=version)

    def get_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        fulls = {self._key(key, version): key for key in keys}
        found = self._cache.get_many(fulls)
        return {fulls[full]: value for full, value in found.items()}

    def set_many(self, data: Mapping[Any, Any], timeout: Any = DEFAULT_TIMEOUT,
                 version: int | None = None) -> list[Any]:
        mapping = {self._key(key, version): value for key, value in data.items()}
        try:
            self._cache.set_many(mapping, self._ttl(timeout))
        except InvalidValueError as exc:
            raise _unpickling_error(exc) from None
        return []

    def delete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        self._cache.delete_many([self._key(key, version) for key in keys])

    def clear(self) -> None:
        """Remove every entry of the store (every alias and prefix sharing LOCATION)."""
        self._cache.clear()

    def close(self, **kwargs: Any) -> None:
        """Django calls this after every request; the per-thread SQLite connection is kept
        open on purpose (reopening it per request would cost more than the request's reads).
        """

    # ---- extras (django-redis users know them) ---------------------------------------------

    def lock(self, name: Any, ttl: float | timedelta | None = 10.0, *,
             version: int | None = None, owner: str | None = None,
             blocking_timeout: float | None = DEFAULT_BLOCKING_TIMEOUT) -> Lock:
        """A lock shared by every process using this store (``with cache.lock("job", 30):``)."""
        return self._cache.lock(self._key(name, version), ttl, owner,
                                blocking_timeout=blocking_timeout)

    def restore_lock(self, name: Any, owner: str, version: int | None = None) -> Lock:
        """A handle on a lock that ``owner`` acquired elsewhere (another request or process)."""
        return self._cache.restore_lock(self._key(name, version), owner)

    def ttl(self, key: Any, version: int | None = None) -> float | None:
        """Seconds left for ``key``: None if it never expires, 0 if missing or expired."""
        return self._cache.ttl(self._key(key, version))

    def pull(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        """Get and delete ``key`` in one transaction."""
        return self._cache.pull(self._key(key, version), default)

    def stats(self) -> dict[str, Any]:
        """Hit and miss counters of this process and figures of the shared store."""
        return self._cache.stats()
