"""The Django backend: Django's cache contract on our store, the extras, and the app's commands.

Django's own suite runs in test_django_suite.py; these tests cover what it does not: sharing
between aliases and processes, the OPTIONS mapping, the memo of keys, the extras, and
``manage.py hypercacheio``.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import pickle
import warnings
from collections.abc import Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import pytest

django = pytest.importorskip("django")

from django.conf import settings  # noqa: E402

if not settings.configured:
    settings.configure(
        INSTALLED_APPS=["hypercacheio.contrib.django"],
        CACHES={"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}},
        USE_TZ=True,
    )
    django.setup()

import click  # noqa: E402
from django.core.cache import CacheKeyWarning, InvalidCacheKey, caches  # noqa: E402
from django.core.exceptions import ImproperlyConfigured  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.core.management.base import CommandError  # noqa: E402
from django.test import override_settings  # noqa: E402

from hypercacheio.contrib.django import HyperCacheIOCache  # noqa: E402
from hypercacheio.contrib.django.backend import _engines  # noqa: E402

BACKEND = "hypercacheio.contrib.django.HyperCacheIOCache"


class Unpicklable:
    def __reduce__(self) -> Any:
        raise pickle.PicklingError("this object refuses to be pickled")


@pytest.fixture(autouse=True)
def no_hypercacheio_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("HYPERCACHEIO_"):
            monkeypatch.delenv(name)
    yield
    for engine in _engines.values():
        engine.close()
    _engines.clear()


@pytest.fixture
def store_dir(tmp_path: Path) -> str:
    return str(tmp_path / "store")


def backend(location: str, **params: Any) -> HyperCacheIOCache:
    return HyperCacheIOCache(location, params)


# ---- the contract -------------------------------------------------------------------------


def test_get_set_add_delete_and_versions(store_dir: str) -> None:
    c = backend(store_dir)
    assert c.get("missing") is None
    assert c.get("missing", "fallback") == "fallback"
    c.set("k", {"a": [1, 2]})
    assert c.get("k") == {"a": [1, 2]}
    assert c.add("k", "other") is False
    assert c.add("new", None) is True
    assert c.has_key("new") and "new" in c
    c.set("k", "v2", version=2)
    assert c.get("k", version=2) == "v2"
    assert c.get("k") == {"a": [1, 2]}
    assert c.delete("k") is True
    assert c.delete("k") is False
    assert c.get("k", version=2) == "v2"
    assert c.incr_version("k", version=2) == 3
    assert c.get("k", version=3) == "v2" and c.get("k", version=2) is None


def test_returned_values_are_copies(store_dir: str) -> None:
    c = backend(store_dir)
    c.set("list", [1, 2])
    got = c.get("list")
    got.append(3)
    assert c.get("list") == [1, 2]


def test_timeouts_none_forever_zero_not_stored_default_from_settings(store_dir: str) -> None:
    c = backend(store_dir, TIMEOUT=60)
    c.set("default", 1)
    ttl = c.ttl("default")
    assert ttl is not None and 55 < ttl <= 60
    c.set("forever", 1, None)
    assert c.ttl("forever") is None
    c.set("zero", 1, 0)
    assert c.get("zero", "gone") == "gone"
    c.set("negative", 1, -5)
    assert c.has_key("negative") is False
    assert c.add("zero-add", 1, 0) is True  # Django: "added" and expired at once
    assert c.has_key("zero-add") is False
    assert c.add("forever", 2, 0) is False
    assert c.touch("forever", 30) is True
    ttl = c.ttl("forever")
    assert ttl is not None and 25 < ttl <= 30
    assert c.touch("forever", 0) is True
    assert c.has_key("forever") is False
    assert c.touch("missing", 10) is False
    assert c.ttl("missing") == 0.0
    forever = backend(store_dir, TIMEOUT=None)
    forever.set("by-default", 1)
    assert forever.ttl("by-default") is None


def test_incr_decr(store_dir: str) -> None:
    c = backend(store_dir)
    with pytest.raises(ValueError, match="not found"):
        c.incr("absent")
    with pytest.raises(ValueError):
        c.decr("absent")
    assert c.has_key("absent") is False  # the failed incr stored nothing
    c.set("n", 10)
    assert c.incr("n") == 11
    assert c.incr("n", 5) == 16
    assert c.decr("n", 20) == -4
    assert c.get("n") == -4
    c.set("text", "abc")
    with pytest.raises(TypeError):
        c.incr("text")
    c.set("f", 1.5)
    assert c.incr("f", 0.5) == 2.0  # a float delta takes Django's generic path


def test_many(store_dir: str) -> None:
    c = backend(store_dir)
    assert c.set_many({"a": 1, "b": "two", "c": None}) == []
    assert c.get_many(["a", "b", "c", "d"]) == {"a": 1, "b": "two", "c": None}
    c.delete_many(["a", "c"])
    assert c.get_many(["a", "b", "c"]) == {"b": "two"}
    c.set_many({"x": 1}, 0)
    assert c.get_many(["x"]) == {}
    c.clear()
    assert c.get_many(["b"]) == {}


def test_unpicklable_raises_the_pickling_error(store_dir: str) -> None:
    c = backend(store_dir)
    for call in (lambda: c.set("u", Unpicklable()), lambda: c.add("u", Unpicklable()),
                 lambda: c.set_many({"u": Unpicklable()})):
        with pytest.raises(pickle.PicklingError, match="refuses"):
            call()
    assert c.has_key("u") is False


def test_memcached_key_warnings_and_long_keys(store_dir: str) -> None:
    c = backend(store_dir)
    with pytest.warns(CacheKeyWarning, match="characters"):
        c.set("has space", 1)
    with pytest.warns(CacheKeyWarning, match="characters"):  # warned again, not memoized
        assert c.get("has space") == 1
    long_key = "é" * 2000  # 4,000 UTF-8 bytes: above the engine's limit of 1,024
    with pytest.warns(CacheKeyWarning, match="longer than 250"):
        c.set(long_key, "long")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CacheKeyWarning)
        assert c.get(long_key) == "long"
        assert c.get("é" * 1999 + "x") is None  # a different long key is a different entry
        assert c.incr_version(long_key) == 2
        # NUL (which the engine keeps for internal names) works as Django's backends do
        for nul_key in ("a\x00b", "\x00add:a"):
            c.set(nul_key, nul_key)
            assert c.get(nul_key) == nul_key and c.get(nul_key + "\x00") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c.set("plain:key-1", 1)  # a portable key warns nothing
        assert c.get("plain:key-1") == 1


def test_key_function_prefix_and_memo_follow_changes(store_dir: str) -> None:
    c = backend(store_dir, KEY_PREFIX="p1")
    c.set("k", "one")
    assert c.engine.get("p1:1:k") == "one"
    c.key_prefix = "p2"
    assert c.get("k") is None
    c.set("k", "two")
    c.key_func = lambda key, prefix, version: f"custom/{key}"
    assert c.get("k") is None
    c.set("k", "three")
    assert c.engine.get("custom/k") == "three"
    c.key_func = lambda key, prefix, version: ""
    with pytest.raises(InvalidCacheKey):
        c.get("k")
    c.key_func = lambda key, prefix, version: 42
    with pytest.raises(InvalidCacheKey, match="non-empty strings"):
        c.set("k", 1)
    dotted = backend(store_dir, KEY_FUNCTION="test_django_backend.upper_key")
    dotted.set("k", "four")
    assert dotted.engine.get("K") == "four"


def upper_key(key: str, prefix: str, version: int) -> str:
    return key.upper()


def test_subclass_make_key_is_honoured(store_dir: str) -> None:
    class Reversed(HyperCacheIOCache):
        def make_key(self, key: Any, version: Any = None) -> str:
            return str(key)[::-1]

    c = Reversed(store_dir, {})
    c.set("abc", 1)
    assert c.engine.get("cba") == 1
    assert c.get("abc") == 1


# ---- configuration -------------------------------------------------------------------------


def test_max_entries_only_when_given(store_dir: str) -> None:
    unlimited = backend(store_dir)
    assert unlimited.engine.settings.max_entries is None
    unlimited.set_many({f"k{i}": i for i in range(400)})  # above Django's implicit 300
    assert len(unlimited.get_many([f"k{i}" for i in range(400)])) == 400
    unlimited.clear()
    culled = backend(store_dir, OPTIONS={"MAX_ENTRIES": 30})
    assert culled.engine.settings.max_entries == 30
    for i in range(1, 50):
        culled.set(f"cull{i}", "v", 1000)
    assert sum(culled.has_key(f"cull{i}") for i in range(1, 50)) == 29  # as Django counts
    culled.clear()
    zero = backend(store_dir, OPTIONS={"MAX_ENTRIES": 30, "CULL_FREQUENCY": 0})
    for i in range(1, 50):
        zero.set(f"cull{i}", "v", 1000)
    assert sum(zero.has_key(f"cull{i}") for i in range(1, 50)) == 19


def test_options_reach_the_engine_and_bad_ones_are_refused(store_dir: str) -> None:
    c = backend(store_dir, OPTIONS={"l1_max_items": 0, "MAX_BYTES": 1 << 20})
    assert c.engine.settings.l1_max_items == 0
    assert c.engine.settings.max_bytes == 1 << 20
    assert c.engine.settings.directory == store_dir
    with pytest.raises(ImproperlyConfigured, match="unknown hypercacheio option 'colour'"):
        backend(store_dir, OPTIONS={"colour": "red"})
    with pytest.raises(ImproperlyConfigured, match="KEY_PREFIX"):
        backend(store_dir, OPTIONS={"prefix": "x"})
    with pytest.raises(ImproperlyConfigured, match="l1_max_items"):
        backend(store_dir, OPTIONS={"l1_max_items": -1})


def test_location_from_environment_when_not_given(
        store_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYPERCACHEIO_SQLITE_PATH", store_dir)
    c = backend("")
    assert c.engine.settings.directory == store_dir
    assert c.engine.settings.prefix == ""  # Django's KEY_PREFIX is the only prefix


def test_equal_configurations_share_one_engine_and_aliases_share_the_store(
        store_dir: str) -> None:
    a = backend(store_dir)
    b = backend(store_dir, TIMEOUT=5)
    prefixed = backend(store_dir, KEY_PREFIX="other")
    assert a.engine is b.engine is prefixed.engine  # Django's settings are not the engine's
    assert backend(store_dir, OPTIONS={"l1_max_items": 5}).engine is not a.engine
    a.set("shared", 1)
    assert prefixed.get("shared") is None
    assert prefixed.engine.get(":1:shared") == 1
    prefixed.clear()  # clear() empties the whole store, like Django's file-based backend
    assert a.get("shared") is None


def _child_increments(location: str, rounds: int) -> None:
    c = HyperCacheIOCache(location, {})
    for _ in range(rounds):
        c.incr("counter")
        c.set("last-writer", os.getpid())


def test_processes_share_counters_and_see_each_others_writes(store_dir: str) -> None:
    c = backend(store_dir)
    c.set("counter", 0)
    c.set("last-writer", "parent")
    assert c.get("last-writer") == "parent"  # now in this process's L1
    ctx = multiprocessing.get_context("fork")
    children = [ctx.Process(target=_child_increments, args=(store_dir, 200)) for _ in range(4)]
    for p in children:
        p.start()
    for p in children:
        p.join(60)
        assert p.exitcode == 0
    assert c.get("counter") == 800
    assert c.get("last-writer") in {p.pid for p in children}


# ---- extras -----------------------------------------------------------------------------------


def test_lock_ttl_pull_and_stats(store_dir: str) -> None:
    c = backend(store_dir)
    lock = c.lock("job", 5)
    assert lock.acquire(blocking=False) is True
    other = c.lock("job", 5)
    assert other.acquire(blocking=False) is False
    restored = c.restore_lock("job", lock.owner)
    assert restored.owned()
    assert restored.release() is True
    assert other.acquire(blocking=False) is True
    other.release()
    with c.lock("job", 5, version=2) as held:
        assert held.locked()
    c.set("once", "value")
    assert c.pull("once") == "value"
    assert c.pull("once", "default") == "default"
    c.get("nothing-here")
    figures = c.stats()
    assert figures["misses"] >= 1 and figures["path"].startswith(store_dir)


def test_async_methods(store_dir: str) -> None:
    c = backend(store_dir)

    async def scenario() -> list[Any]:
        await c.aset("a", 1)
        await c.aset_many({"b": 2})
        return [await c.aget("a"), await c.aincr("a", 4), await c.aadd("a", 9),
                await c.aget_many(["a", "b"]), await c.ahas_key("b"),
                await c.adelete("b"), await c.aget_or_set("c", lambda: 3)]

    assert asyncio.run(scenario()) == [1, 5, False, {"a": 5, "b": 2}, True, True, 3]


# ---- the app's management command ---------------------------------------------------------


def caches_setting(store_dir: str) -> dict[str, Any]:
    return {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "shared": {"BACKEND": BACKEND, "LOCATION": store_dir, "OPTIONS": {"l1_max_items": 50}},
    }


def test_command_install_and_stats(store_dir: str) -> None:
    with override_settings(CACHES=caches_setting(store_dir)):
        out = StringIO()
        call_command("hypercacheio", "install", stdout=out)
        text = out.getvalue()
        assert "database created" in text and store_dir in text
        assert f"HYPERCACHEIO_SQLITE_PATH={store_dir}" in text
        assert "HYPERCACHEIO_L1_MAX_ITEMS=50" in text
        assert "changeme" in text and "(default" in text
        assert Path(store_dir, "hypercacheio.sqlite").exists()
        out = StringIO()
        call_command("hypercacheio", "install", stdout=out)
        assert "database exists" in out.getvalue()

        caches["shared"].set("a", 1)
        caches["shared"].set("b", 2)
        out = StringIO()
        call_command("hypercacheio", "--alias", "shared", "stats", "--json", stdout=out)
        figures = json.loads(out.getvalue())
        assert figures["entries"] == 2
        out = StringIO()
        call_command("hypercacheio", "stats", stdout=out)
        assert "CACHES['shared']" in out.getvalue() and "entries" in out.getvalue()

        with pytest.raises(CommandError, match="not a hypercacheio cache"):
            call_command("hypercacheio", "--alias", "default", "stats")
        with pytest.raises(CommandError, match="no cache alias 'nope'"):
            call_command("hypercacheio", "--alias", "nope", "stats")


def test_command_delegates_check_and_node_to_the_cli(
        store_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from hypercacheio import cli

    seen: list[tuple[str, str, tuple[str, ...]]] = []

    @click.group()
    def fake_main() -> None:
        pass

    @fake_main.command(context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def node(args: tuple[str, ...]) -> None:
        seen.append(("node", os.environ["HYPERCACHEIO_SQLITE_PATH"], args))

    monkeypatch.setattr(cli, "main", fake_main)
    with override_settings(CACHES=caches_setting(store_dir)):
        call_command("hypercacheio", "node", "start", "--foreground")
        call_command("hypercacheio", "--alias", "shared", "node", "--force", "-x")
        assert seen == [("node", store_dir, ("start", "--foreground")),
                        ("node", store_dir, ("--force", "-x"))]
        assert "HYPERCACHEIO_SQLITE_PATH" not in os.environ  # restored afterwards
        with pytest.raises(CommandError, match="not available"):
            call_command("hypercacheio", "check")


def test_command_runs_the_real_cli_help(store_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    from hypercacheio import cli

    if "node" not in getattr(cli.main, "commands", {}):
        pytest.skip("this checkout's CLI has no `node` command yet")
    with override_settings(CACHES=caches_setting(store_dir)):
        call_command("hypercacheio", "node", "--help")
    out = capsys.readouterr().out
    assert "Usage: manage.py hypercacheio node" in out and "start" in out


# ---- a secondary host ---------------------------------------------------------------------


def test_a_secondary_host_writes_through_the_primary_and_reads_its_writes(
        tmp_path: Path) -> None:
    from cluster_helpers import Cluster
    from hypercacheio import Cache
    from hypercacheio.replication.forward import SecondaryCache
    from node_helpers import TOKEN

    with Cluster(tmp_path / "cluster", secondaries=1) as cluster:
        (node,) = cluster.secondaries
        cache = backend(node.directory, OPTIONS={
            "role": "secondary", "primary_url": cluster.primary.url, "api_token": TOKEN})
        assert isinstance(cache.engine, SecondaryCache)
        on_primary = Cache(cluster.primary.directory)
        here = Cache(node.directory)  # another process of this host
        cache.set("page", {"html": "<p>"}, 300)
        assert cache.get("page") == {"html": "<p>"}
        full = cache.make_and_validate_key("page")
        assert on_primary.get(full) == {"html": "<p>"} == here.get(full)
        assert cache.add("once", 1) and not cache.add("once", 2)
        assert cache.incr("once", 5) == 6 and on_primary.get(cache.make_and_validate_key(
            "once")) == 6
        with pytest.raises(ValueError):
            cache.incr("missing")  # Django's contract, decided on the primary
        assert cache.delete("page") and cache.get("page") is None
        assert on_primary.get(full) is None
        with cache.lock("job", 30) as held:
            assert held.fence is not None
            assert not on_primary.lock(cache.make_and_validate_key("job")).acquire(
                blocking=False)
        assert cluster.wait_converged()
