"""The Flask-Caching backend, through Flask-Caching's public API in real Flask apps."""

from __future__ import annotations

import multiprocessing
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flask_caching")

from flask import Flask, request  # noqa: E402
from flask_caching import Cache as FlaskCache  # noqa: E402

from hypercacheio.contrib.flask import HyperCacheIOCache  # noqa: E402

CLASS_PATH = "hypercacheio.contrib.flask.HyperCacheIOCache"
FUNCTION_PATH = "hypercacheio.contrib.flask.hypercacheio"


@pytest.fixture(autouse=True)
def no_hypercacheio_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("HYPERCACHEIO_"):
            monkeypatch.delenv(name)


@pytest.fixture
def store_dir(tmp_path: Path) -> str:
    return str(tmp_path / "store")


def make_app(store_dir: str, cache_type: str = CLASS_PATH,
             **config: Any) -> tuple[Flask, FlaskCache, dict[str, int]]:
    """An app with a memoized function and a cached view, counting real computations."""
    app = Flask(__name__)
    app.config.update(CACHE_TYPE=cache_type, CACHE_DIR=store_dir, CACHE_DEFAULT_TIMEOUT=120,
                      **config)
    cache = FlaskCache(app)
    calls = {"square": 0, "view": 0}

    @cache.memoize(timeout=60)
    def square(n: int) -> int:
        calls["square"] += 1
        return n * n

    @app.route("/square/<int:n>")
    def square_view(n: int) -> str:
        return str(square(n))

    @app.route("/report")
    @cache.cached(timeout=60, query_string=True)
    def report() -> str:
        calls["view"] += 1
        return f"report {calls['view']} for {request.args.get('who', 'all')}"

    @app.route("/forget/<int:n>", methods=["POST"])
    def forget(n: int) -> str:
        cache.delete_memoized(square, n)
        return "ok"

    app.extensions["square"] = square
    return app, cache, calls


@pytest.mark.parametrize("cache_type", [CLASS_PATH, FUNCTION_PATH])
def test_memoize_and_delete_memoized(store_dir: str, cache_type: str) -> None:
    app, cache, calls = make_app(store_dir, cache_type)
    assert isinstance(cache.cache, HyperCacheIOCache)
    client = app.test_client()
    assert client.get("/square/7").text == "49"
    assert client.get("/square/7").text == "49"
    assert client.get("/square/8").text == "64"
    assert calls["square"] == 2
    assert client.post("/forget/7").text == "ok"
    assert client.get("/square/7").text == "49"
    assert client.get("/square/8").text == "64"
    assert calls["square"] == 3  # only 7 was forgotten
    with app.app_context():
        cache.delete_memoized(app.extensions["square"])  # every argument
    client.get("/square/8")
    assert calls["square"] == 4


def test_cached_view(store_dir: str) -> None:
    app, cache, calls = make_app(store_dir)
    client = app.test_client()
    first = client.get("/report?who=ann").text
    assert first == "report 1 for ann"
    assert client.get("/report?who=ann").text == first
    assert client.get("/report?who=bob").text == "report 2 for bob"
    assert calls["view"] == 2
    with app.app_context():
        cache.clear()
    assert client.get("/report?who=ann").text == "report 3 for ann"


def test_two_apps_on_one_directory_share_entries(store_dir: str) -> None:
    """Two apps stand for two worker processes of one deployment."""
    app_a, cache_a, calls_a = make_app(store_dir)
    app_b, cache_b, calls_b = make_app(store_dir)
    assert app_a.test_client().get("/report?who=x").text == "report 1 for x"
    assert app_b.test_client().get("/report?who=x").text == "report 1 for x"
    assert calls_b["view"] == 0  # served from what app A stored
    with app_b.app_context():
        cache_b.set("note", {"from": "b"})
    with app_a.app_context():
        assert cache_a.get("note") == {"from": "b"}
        cache_a.delete("note")
    with app_b.app_context():
        assert cache_b.get("note") is None


def test_config_keys_reach_the_engine(store_dir: str, tmp_path: Path) -> None:
    _, cache, _ = make_app(store_dir, CACHE_KEY_PREFIX="shop_", HYPERCACHEIO_L1_MAX_ITEMS=0,
                           CACHE_OPTIONS={"max_bytes": 1 << 20})
    backend = cache.cache
    assert isinstance(backend, HyperCacheIOCache)
    s = backend.engine.settings
    assert (s.directory, s.prefix, s.l1_max_items, s.max_bytes) == (store_dir, "shop_", 0,
                                                                    1 << 20)
    backend.set("k", 1)
    assert backend.engine.store.get("shop_k") is not None
    other = str(tmp_path / "from-config")
    app = Flask(__name__)
    app.config.update(CACHE_TYPE=CLASS_PATH, HYPERCACHEIO_SQLITE_PATH=other)
    assert FlaskCache(app).cache.engine.settings.directory == other


def test_timeouts_follow_cachelib(store_dir: str) -> None:
    _, cache, _ = make_app(store_dir)
    backend = cache.cache
    assert backend.set("default", 1)
    ttl = backend.ttl("default")
    assert ttl is not None and 115 < ttl <= 120  # CACHE_DEFAULT_TIMEOUT
    backend.set("never", 1, timeout=0)
    assert backend.ttl("never") is None
    backend.set("gone", 1, timeout=-1)
    assert backend.has("gone") is False
    assert backend.add("gone", 1, timeout=-1) is True
    assert backend.has("gone") is False
    backend.set("short", 1, timeout=30)
    ttl = backend.ttl("short")
    assert ttl is not None and 25 < ttl <= 30


def test_the_cachelib_contract(store_dir: str) -> None:
    backend = HyperCacheIOCache(directory=store_dir, default_timeout=0)
    assert backend.get("missing") is None and backend.has("missing") is False
    assert backend.add("a", [1]) is True
    assert backend.add("a", [2]) is False
    assert backend.set_many({"b": 2, "c": "three"}) == ["b", "c"]
    assert backend.get_many("a", "b", "x") == [[1], 2, None]
    assert backend.get_dict("b", "c") == {"b": 2, "c": "three"}
    assert backend.delete_many("a", "b", "x") == ["a", "b", "x"]
    assert backend.has("a") is False and backend.delete("c") is True
    assert backend.inc("n") == 1 and backend.inc("n", 5) == 6 and backend.dec("n", 2) == 4
    long_key = "k" * 5000
    backend.set(long_key, "long")
    assert backend.get(long_key) == "long" and backend.get("k" * 4999) is None
    with backend.lock("job", 5) as lock:
        assert lock.locked()
        assert backend.lock("job", 5).acquire(blocking=False) is False
    # NUL, which the engine keeps for internal names, works as in any cachelib backend
    for nul_key in ("a\x00b", "\x00add:a"):
        backend.set(nul_key, nul_key)
        assert backend.get(nul_key) == nul_key and backend.get(nul_key + "\x00") is None
        with backend.lock(nul_key, 5) as lock:
            assert lock.locked()
    assert backend.clear() is True
    assert backend.get(long_key) is None


class Unpicklable:
    def __reduce__(self) -> Any:
        raise pickle.PicklingError("no pickling here")


def test_pickling_errors_are_raised_as_such(store_dir: str) -> None:
    backend = HyperCacheIOCache(directory=store_dir)
    with pytest.raises(pickle.PickleError):
        backend.set("u", Unpicklable())
    with pytest.raises(pickle.PickleError):
        backend.add("u", Unpicklable())
    assert backend.has("u") is False


def _increment(store_dir: str, rounds: int) -> None:
    backend = HyperCacheIOCache(directory=store_dir)
    for _ in range(rounds):
        backend.inc("hits")


@pytest.fixture
def fork() -> Iterator[Any]:
    yield multiprocessing.get_context("fork")


def test_inc_is_atomic_across_processes(store_dir: str, fork: Any) -> None:
    workers = [fork.Process(target=_increment, args=(store_dir, 150)) for _ in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(60)
        assert p.exitcode == 0
    assert HyperCacheIOCache(directory=store_dir).get("hits") == 600


def test_a_secondary_host_writes_through_the_primary(tmp_path: Path) -> None:
    from cluster_helpers import Cluster
    from hypercacheio import Cache
    from hypercacheio.replication.forward import SecondaryCache
    from node_helpers import TOKEN

    with Cluster(tmp_path / "cluster", secondaries=1) as cluster:
        (node,) = cluster.secondaries
        app, cache, calls = make_app(node.directory, HYPERCACHEIO_SERVER_ROLE="secondary",
                                     HYPERCACHEIO_PRIMARY_URL=cluster.primary.url,
                                     HYPERCACHEIO_API_TOKEN=TOKEN)
        backend = cache.cache
        assert isinstance(backend, HyperCacheIOCache)
        assert isinstance(backend.engine, SecondaryCache)
        client = app.test_client()
        assert client.get("/square/7").data == b"49"
        assert client.get("/square/7").data == b"49"
        assert calls["square"] == 1  # the second read found this host's own write
        on_primary = Cache(cluster.primary.directory, prefix=backend.engine.prefix)
        assert cache.set("k", "v") and cache.get("k") == "v"
        assert on_primary.get("k") == "v"
        assert backend.inc("n", 3) == 3 and on_primary.get("n") == 3
        assert cache.delete("k") and cache.get("k") is None and on_primary.get("k") is None
        assert cluster.wait_converged()
