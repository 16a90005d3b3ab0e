"""The Flask-Caching backend: cachelib's cache contract translated onto ``Cache``.

``app.config["CACHE_TYPE"] = "hypercacheio.contrib.flask.HyperCacheIOCache"`` (or the factory
function ``hypercacheio.contrib.flask.hypercacheio``). The store directory is ``CACHE_DIR``,
else ``HYPERCACHEIO_SQLITE_PATH`` from the app's config, else the environment's; every other
``HYPERCACHEIO_*`` key of the app's config is read like the variable of that name, and
``CACHE_OPTIONS`` may hold engine keywords (``l1_max_items``, ``max_bytes``, ...).
``CACHE_KEY_PREFIX`` prefixes every key; ``CACHE_DEFAULT_TIMEOUT`` is the default timeout.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from flask import Flask
from flask_caching.backends.base import BaseCache

from ..cache import Cache
from ..config import ENV_VARS, Settings
from ..errors import InvalidValueError
from ..lock import DEFAULT_BLOCKING_TIMEOUT, Lock
from . import fit_engine_key

_KNOWN_VARIABLES = frozenset(name for names in ENV_VARS.values() for name in names)


def _pickling_error(exc: InvalidValueError) -> BaseException:
    return exc.__cause__ if isinstance(exc.__cause__, Exception) else exc


class HyperCacheIOCache(BaseCache):
    """A Flask-Caching cache whose entries every worker process of the host shares.

    Timeouts follow cachelib: None means the default timeout, 0 means never expire, and a
    negative timeout stores nothing.
    """

    def __init__(self, default_timeout: int = 300,
                 ignore_delete_many_errors: bool = False, *,
                 settings: Settings | None = None, **options: Any) -> None:
        super().__init__(default_timeout=default_timeout,
                         ignore_delete_many_errors=ignore_delete_many_errors)
        given = {"default_ttl": None, **options}
        try:
            self._cache = Cache(settings=settings, **given)
        except TypeError as exc:
            raise TypeError(f"hypercacheio Flask-Caching backend: {exc}") from None

    @classmethod
    def factory(cls, app: Flask, config: dict[str, Any], args: list[Any],
                kwargs: dict[str, Any]) -> HyperCacheIOCache:
        """Flask-Caching's hook: build the cache from the app's config."""
        return cls(*args, settings=settings_from_flask_config(config, kwargs), **kwargs)

    @property
    def engine(self) -> Cache:
        """The ``hypercacheio.Cache`` behind this backend."""
        return self._cache

    def _ttl(self, timeout: int | float | timedelta | None) -> int | float | None:
        seconds = self._normalize_timeout(timeout)  # type: ignore[arg-type]
        if seconds == 0:
            return None
        return seconds if seconds > 0 else 0

    # ---- cachelib's contract ---------------------------------------------------------------

    def get(self, key: str) -> Any:
        return self._cache.get(fit_engine_key(key))

    def has(self, key: str) -> bool:
        return self._cache.has(fit_engine_key(key))

    def set(self, key: str, value: Any, timeout: int | timedelta | None = None) -> bool:
        try:
            return self._cache.set(fit_engine_key(key), value, self._ttl(timeout))
        except InvalidValueError as exc:
            raise _pickling_error(exc) from None

    def add(self, key: str, value: Any, timeout: int | timedelta | None = None) -> bool:
        ttl = self._ttl(timeout)
        if ttl == 0:  # "added" and expired at once, as cachelib's own caches do
            return not self._cache.has(fit_engine_key(key))
        try:
            return self._cache.add(fit_engine_key(key), value, ttl)
        except InvalidValueError as exc:
            raise _pickling_error(exc) from None

    def delete(self, key: str) -> bool:
        return self._cache.delete(fit_engine_key(key))

    def get_many(self, *keys: str) -> list[Any]:
        fitted = [fit_engine_key(key) for key in keys]
        found = self._cache.get_many(fitted)
        return [found.get(key) for key in fitted]

    def set_many(self, mapping: Mapping[str, Any],
                 timeout: int | timedelta | None = None) -> list[Any]:
        try:
            self._cache.set_many({fit_engine_key(k): v for k, v in mapping.items()},
                                 self._ttl(timeout))
        except InvalidValueError as exc:
            raise _pickling_error(exc) from None
        return list(mapping)

    def delete_many(self, *keys: str) -> list[Any]:
        self._cache.delete_many([fit_engine_key(key) for key in keys])
        return list(keys)

    def clear(self) -> bool:
        """Empty the whole store (every prefix and every app sharing the directory)."""
        self._cache.clear()
        return True

    def inc(self, key: str, delta: int = 1) -> int:
        """Atomic across processes; a missing key starts from 0."""
        return self._cache.incr(fit_engine_key(key), delta)

    def dec(self, key: str, delta: int = 1) -> int:
        return self._cache.decr(fit_engine_key(key), delta)

    # ---- extras ------------------------------------------------------------------------------

    def lock(self, name: str, ttl: float | timedelta | None = 10.0, *,
             owner: str | None = None,
             blocking_timeout: float | None = DEFAULT_BLOCKING_TIMEOUT) -> Lock:
        """A lock shared by every process using this store."""
        return self._cache.lock(fit_engine_key(name), ttl, owner,
                                blocking_timeout=blocking_timeout)

    def ttl(self, key: str) -> float | None:
        """Seconds left for ``key``: None if it never expires, 0 if missing or expired."""
        return self._cache.ttl(fit_engine_key(key))


def settings_from_flask_config(config: Mapping[str, Any], kwargs: dict[str, Any]) -> Settings:
    """Engine settings from a Flask config; engine keywords in ``kwargs`` are taken out."""
    kwargs.pop("default_ttl", None)
    overrides = {name: kwargs.pop(name) for name in list(kwargs)
                 if name not in ("default_timeout", "ignore_delete_many_errors")}
    environ = {k: v for k, v in os.environ.items() if k.startswith("HYPERCACHEIO_")}
    for name, value in config.items():
        if name in _KNOWN_VARIABLES:
            environ[name] = ",".join(value) if isinstance(value, (list, tuple)) else str(value)
    if config.get("CACHE_DIR"):
        overrides.setdefault("directory", str(config["CACHE_DIR"]))
    overrides.setdefault("prefix", config.get("CACHE_KEY_PREFIX") or "")
    overrides["default_ttl"] = None  # cachelib's timeouts are applied here, per call
    return Settings.from_env(environ, **overrides)


def hypercacheio(app: Flask, config: dict[str, Any], args: list[Any],
                 kwargs: dict[str, Any]) -> HyperCacheIOCache:
    """Factory function form: ``CACHE_TYPE = "hypercacheio.contrib.flask.hypercacheio"``."""
    return HyperCacheIOCache.factory(app, config, args, kwargs)


__all__ = ["HyperCacheIOCache", "hypercacheio", "settings_from_flask_config"]
