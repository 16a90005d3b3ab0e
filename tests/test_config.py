"""config: defaults, environment variables and their aliases, validation."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import pytest

from hypercacheio import Cache, ConfigError, Settings
from hypercacheio.config import ENV_VARS, default_directory


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    s = Settings()
    assert s.directory == str(tmp_path / "hypercacheio") == default_directory()
    assert s.role == "primary"
    assert s.api_token == "changeme"
    assert s.async_requests is True
    assert s.server_type == "embedded"
    assert s.secondary_urls == ()
    assert s.default_ttl is None
    assert s.l1_max_items == 10_000
    assert s.clustered is False
    assert s.node_url == "http://127.0.0.1:8080/api/hypercacheio"


def test_from_env_reads_every_variable(tmp_path: Any) -> None:
    env = {
        "HYPERCACHEIO_SQLITE_PATH": str(tmp_path / "d"),
        "HYPERCACHEIO_PREFIX": "app:",
        "HYPERCACHEIO_DEFAULT_TTL": "30",
        "HYPERCACHEIO_L1_MAX_ITEMS": " 5 ",
        "HYPERCACHEIO_L1_MAX_AGE": "2.5",
        "HYPERCACHEIO_MAX_BYTES": "1048576",
        "HYPERCACHEIO_MAX_ENTRIES": "100",
        "HYPERCACHEIO_CULL_FREQUENCY": "0",
        "HYPERCACHEIO_BUSY_TIMEOUT": "5",
        "HYPERCACHEIO_ALLOW_NETWORK_FS": "yes",
        "HYPERCACHEIO_SERVER_ROLE": " Secondary ",
        "HYPERCACHEIO_PRIMARY_URL": "https://primary.example:9000/api/hypercacheio/",
        "HYPERCACHEIO_SECONDARY_URLS": " http://a:1 , https://b/x/ ,, ",
        "HYPERCACHEIO_API_TOKEN": "s3cret",
        "HYPERCACHEIO_ASYNC": "false",
        "HYPERCACHEIO_TIMEOUT": "0.5",
        "HYPERCACHEIO_SERVER_TYPE": "go",
        "HYPERCACHEIO_GO_HOST": "10.0.0.1",
        "HYPERCACHEIO_GO_LISTEN_HOST": "0.0.0.0",
        "HYPERCACHEIO_GO_PORT": "9090",
        "HYPERCACHEIO_NODE_SOCKET": "/run/h.sock",
        "HYPERCACHEIO_HA_ENABLED": "0",
        "HYPERCACHEIO_PEER_ADDRS": "10.0.0.2:7400, host-b:7401",
        "HYPERCACHEIO_REPL_PORT": "7500",
    }
    s = Settings.from_env(env)
    assert s.directory == str(tmp_path / "d")
    assert s.prefix == "app:"
    assert s.default_ttl == 30.0
    assert s.l1_max_items == 5
    assert s.l1_max_age == 2.5
    assert s.max_bytes == 1048576
    assert s.max_entries == 100
    assert s.cull_frequency == 0
    assert s.busy_timeout == 5.0
    assert s.allow_network_fs is True
    assert s.role == "secondary"
    assert s.primary_url == "https://primary.example:9000/api/hypercacheio"
    assert s.secondary_urls == ("http://a:1", "https://b/x")
    assert s.api_token == "s3cret"
    assert s.async_requests is False
    assert s.timeout == 0.5
    assert s.server_type == "node"
    assert (s.node_host, s.node_listen_host, s.node_port) == ("10.0.0.1", "0.0.0.0", 9090)
    assert s.node_socket == "/run/h.sock"
    assert s.ha_enabled is False
    assert s.peer_addrs == ("10.0.0.2:7400", "host-b:7401")
    assert s.repl_port == 7500
    assert s.clustered is True  # secondary URLs alone make it clustered


def test_new_names_win_over_php_aliases() -> None:
    s = Settings.from_env({"HYPERCACHEIO_NODE_PORT": "1000", "HYPERCACHEIO_GO_PORT": "2000",
                           "HYPERCACHEIO_NODE_HOST": "new", "HYPERCACHEIO_GO_HOST": "old"})
    assert (s.node_port, s.node_host) == (1000, "new")


def test_every_field_has_an_env_var() -> None:
    fields = set(Settings.__dataclass_fields__)
    assert fields == set(ENV_VARS)
    for names in ENV_VARS.values():
        assert all(n.startswith("HYPERCACHEIO_") for n in names)


def test_keyword_overrides_win_over_env() -> None:
    s = Settings.from_env({"HYPERCACHEIO_PREFIX": "env:"}, prefix="kw:")
    assert s.prefix == "kw:"


@pytest.mark.parametrize("server_type", ["laravel", "embedded", " EMBEDDED "])
def test_server_type_aliases(server_type: str) -> None:
    assert Settings(server_type=server_type).server_type == "embedded"


@pytest.mark.parametrize(("ttl", "seconds"), [(timedelta(minutes=1), 60.0), ("  ", None),
                                              ("none", None), (5, 5.0), ("1.5", 1.5)])
def test_default_ttl_forms(ttl: Any, seconds: float | None) -> None:
    assert Settings(default_ttl=ttl).default_ttl == seconds


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"HYPERCACHEIO_SERVER_ROLE": "master"}, "HYPERCACHEIO_SERVER_ROLE"),
        ({"HYPERCACHEIO_PRIMARY_URL": "not a url"}, "HYPERCACHEIO_PRIMARY_URL"),
        ({"HYPERCACHEIO_PRIMARY_URL": "ftp://host/x"}, "HYPERCACHEIO_PRIMARY_URL"),
        ({"HYPERCACHEIO_PRIMARY_URL": "http://host:99999/x"}, "HYPERCACHEIO_PRIMARY_URL"),
        ({"HYPERCACHEIO_ASYNC": "maybe"}, "HYPERCACHEIO_ASYNC"),
        ({"HYPERCACHEIO_HA_ENABLED": "2"}, "HYPERCACHEIO_HA_ENABLED"),
        ({"HYPERCACHEIO_ALLOW_NETWORK_FS": "sure"}, "allow_network_fs"),
        ({"HYPERCACHEIO_SERVER_TYPE": "redis"}, "HYPERCACHEIO_SERVER_TYPE"),
        ({"HYPERCACHEIO_GO_PORT": "http"}, "HYPERCACHEIO_NODE_PORT"),
        ({"HYPERCACHEIO_NODE_PORT": "70000"}, "between 0 and 65535"),
        ({"HYPERCACHEIO_REPL_PORT": "0"}, "HYPERCACHEIO_REPL_PORT"),
        ({"HYPERCACHEIO_PEER_ADDRS": "hostonly"}, "HYPERCACHEIO_PEER_ADDRS"),
        ({"HYPERCACHEIO_PEER_ADDRS": "host:notaport"}, "HYPERCACHEIO_PEER_ADDRS"),
        ({"HYPERCACHEIO_PEER_ADDRS": ":7400"}, "HYPERCACHEIO_PEER_ADDRS"),
        ({"HYPERCACHEIO_DEFAULT_TTL": "soon"}, "default_ttl"),
        ({"HYPERCACHEIO_DEFAULT_TTL": "0"}, "default_ttl"),
        ({"HYPERCACHEIO_DEFAULT_TTL": "-3"}, "default_ttl"),
        ({"HYPERCACHEIO_DEFAULT_TTL": "nan"}, "default_ttl"),
        ({"HYPERCACHEIO_L1_MAX_ITEMS": "-1"}, "l1_max_items"),
        ({"HYPERCACHEIO_L1_MAX_ITEMS": "1.5"}, "l1_max_items"),
        ({"HYPERCACHEIO_L1_MAX_AGE": "0"}, "l1_max_age"),
        ({"HYPERCACHEIO_L1_MAX_AGE": "nan"}, "l1_max_age"),
        ({"HYPERCACHEIO_MAX_BYTES": "100"}, "max_bytes"),
        ({"HYPERCACHEIO_MAX_ENTRIES": "0"}, "max_entries"),
        ({"HYPERCACHEIO_CULL_FREQUENCY": "-1"}, "cull_frequency"),
        ({"HYPERCACHEIO_BUSY_TIMEOUT": "0"}, "busy_timeout"),
        ({"HYPERCACHEIO_BUSY_TIMEOUT": "NaN"}, "busy_timeout"),
        ({"HYPERCACHEIO_TIMEOUT": "-1"}, "timeout"),
        ({"HYPERCACHEIO_GO_HOST": "  "}, "node_host"),
    ],
)
def test_invalid_env_values(env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError, match=says) as info:
        Settings.from_env(env)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prefix": 3},
        {"prefix": "\x00add:"},  # prefix + key is a stored key: no NUL (codec.check_key)
        {"default_ttl": True},
        {"default_ttl": float("nan")},
        {"default_ttl": object()},
        {"l1_max_items": True},
        {"l1_max_items": 2.5},
        {"l1_max_items": float("inf")},
        {"l1_max_items": "many"},
        {"max_entries": -1},
        {"api_token": 123},
        {"busy_timeout": None},
        {"l1_max_age": -1},
    ],
)
def test_invalid_keyword_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        Settings(**kwargs)


def test_cache_rejects_invalid_settings(cache_dir: str) -> None:
    with pytest.raises(ConfigError, match="l1_max_items"):
        Cache(cache_dir, l1_max_items=-1)
    with pytest.raises(TypeError, match="no_such_option"):
        Cache(cache_dir, no_such_option=1)


def test_integral_float_is_an_int() -> None:
    assert Settings(l1_max_items=5.0).l1_max_items == 5


def test_secondary_urls_invalid_dropped_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    raw = " http://ok-1:8080/api , ftp://bad-scheme ,not-a-url, http://bad-port:99999 ," \
          "http://worse:port ,https://ok-2 "
    with caplog.at_level(logging.WARNING, logger="hypercacheio.config"):
        s = Settings.from_env({"HYPERCACHEIO_SECONDARY_URLS": raw})
    assert s.secondary_urls == ("http://ok-1:8080/api", "https://ok-2")
    text = caplog.text
    for bad in ("ftp://bad-scheme", "not-a-url", "http://bad-port:99999", "http://worse:port"):
        assert bad in text
    assert "ok-1" not in text and "ok-2" not in text
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_secondary_urls_as_a_list() -> None:
    assert Settings(secondary_urls=["http://a/", " http://b "]).secondary_urls == (
        "http://a", "http://b")


def test_peer_addrs_and_clustered() -> None:
    s = Settings(peer_addrs="a:1, b:2")
    assert s.peer_addrs == ("a:1", "b:2")
    assert s.clustered is True
    assert Settings(peer_addrs="a:1", ha_enabled=False).clustered is False


def test_cache_from_env(tmp_path: Any) -> None:
    env = {"HYPERCACHEIO_SQLITE_PATH": str(tmp_path / "envdir"), "HYPERCACHEIO_PREFIX": "p:"}
    with Cache.from_env(env) as c:
        c.set("k", 1)
        assert c.get("k") == 1
        assert c.prefix == "p:"
        assert c.store.directory == str(tmp_path / "envdir")
        assert c.store.conn().execute("SELECT key FROM entries").fetchall() == [("p:k",)]


def test_cache_from_env_invalid(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="HYPERCACHEIO_SERVER_ROLE"):
        Cache.from_env({"HYPERCACHEIO_SQLITE_PATH": str(tmp_path), "HYPERCACHEIO_SERVER_ROLE": "x"})


def test_replace_validates() -> None:
    s = Settings()
    assert s.replace(prefix="x").prefix == "x"
    with pytest.raises(ConfigError):
        s.replace(cull_frequency=-2)
