"""The engine's command line: install, stats and the admin verbs, through click's runner."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hypercacheio import Cache
from hypercacheio.cli import main


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    for name in list(os.environ):
        if name.startswith("HYPERCACHEIO_"):
            monkeypatch.delenv(name)
    return CliRunner()


def run(runner: CliRunner, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Exit code and everything printed (stdout and stderr)."""
    result = runner.invoke(main, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.output


def run_out(runner: CliRunner, *args: str, env: dict[str, str] | None = None
            ) -> tuple[int, str, str]:
    """Exit code, stdout and stderr apart."""
    result = runner.invoke(main, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_install_creates_then_is_idempotent(runner: CliRunner, tmp_path: Path) -> None:
    d = str(tmp_path / "store")
    code, out = run(runner, "install", "-d", d)
    assert code == 0 and "database created" in out
    Cache(d).set("kept", 1)
    code, out = run(runner, "install", "-d", d)
    assert code == 0 and "database exists" in out
    assert Cache(d).get("kept") == 1  # a second install changes nothing


def test_install_writes_env_file_without_the_token(runner: CliRunner, tmp_path: Path) -> None:
    d, env_file = str(tmp_path / "store"), tmp_path / "hc.env"
    secret = "s3cret-token-value-1234"
    code, out = run(runner, "install", "-d", d, "--write-env", str(env_file),
                    env={"HYPERCACHEIO_API_TOKEN": secret, "HYPERCACHEIO_NODE_PORT": "9123"})
    assert code == 0
    text = env_file.read_text()
    assert f"HYPERCACHEIO_SQLITE_PATH={d}\n" in text
    assert "HYPERCACHEIO_NODE_PORT=9123\n" in text
    assert secret not in text and secret not in out
    assert "HYPERCACHEIO_API_TOKEN" not in text  # not even a placeholder that would load
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600


def test_admin_verbs(runner: CliRunner, tmp_path: Path) -> None:
    d = str(tmp_path / "store")
    assert run(runner, "set", "-d", d, "greeting", "hello")[0] == 0
    assert run(runner, "set", "-d", d, "n", "41", "--type", "int")[0] == 0
    assert run(runner, "set", "-d", d, "doc", '{"a": [1]}', "--type", "json")[0] == 0
    assert run_out(runner, "get", "-d", d, "greeting")[:2] == (0, "hello\n")
    assert run_out(runner, "get", "-d", d, "doc")[:2] == (0, '{"a": [1]}\n')  # JSON back
    assert json.loads(run_out(runner, "get", "-d", d, "doc")[1]) == {"a": [1]}
    assert Cache(d).incr("n") == 42  # stored as an integer
    code, out, err = run_out(runner, "stats", "-d", d, "--json")
    assert code == 0 and json.loads(out)["entries"] == 3  # stdout is JSON only
    assert f"storage: {d}" in err
    assert run(runner, "delete", "-d", d, "greeting")[0] == 0
    assert run(runner, "delete", "-d", d, "greeting")[0] == 1
    assert run(runner, "get", "-d", d, "greeting")[0] == 1
    assert run_out(runner, "clear", "-d", d, "--yes")[:2] == (0, "cleared\n")
    assert Cache(d).get("n") is None


def test_set_with_ttl_and_purge(runner: CliRunner, tmp_path: Path) -> None:
    d = str(tmp_path / "store")
    assert run(runner, "set", "-d", d, "k", "v", "--ttl", "30")[0] == 0
    assert 0 < Cache(d).ttl("k") <= 30  # type: ignore[operator]
    code, out = run(runner, "purge", "-d", d)
    assert code == 0 and "removed 0 expired" in out
    assert Cache(d).get("k") == "v"


def test_bad_input_is_a_clear_error_and_changes_nothing(runner: CliRunner, tmp_path: Path) -> None:
    d = str(tmp_path / "store")
    run(runner, "set", "-d", d, "k", "before")
    code, out = run(runner, "set", "-d", d, "k" * 1025, "v")
    assert code == 1 and "1024 UTF-8 bytes" in out
    code, out = run(runner, "set", "-d", d, "k", "nope", "--type", "int")
    assert code == 2 and "not valid int" in out
    code, out = run(runner, "set", "-d", d, "k", "{", "--type", "json")
    assert code == 2 and "not valid json" in out
    code, out = run(runner, "set", "-d", d, "k", "v", "--ttl", "nan")
    assert code == 1 and "NaN" in out
    code, out = run(runner, "stats", "-d", d, env={"HYPERCACHEIO_SERVER_ROLE": "leader"})
    assert code == 1 and "HYPERCACHEIO_SERVER_ROLE" in out
    result = runner.invoke(main, ["clear", "-d", d], input="n\n")
    assert result.exit_code == 1  # declined: aborted
    assert Cache(d).get("k") == "before"


def test_storage_path_that_is_a_file(runner: CliRunner, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, out = run(runner, "install", "-d", str(blocker / "store"))
    assert code == 1 and "cannot create the storage directory" in out


def test_console_script_runs(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("hypercacheio")
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "hypercacheio.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPERCACHEIO_")}
    env["HYPERCACHEIO_SQLITE_PATH"] = str(tmp_path / "store")
    out = subprocess.run([*argv, "install"], env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert "database created" in out
    version = subprocess.run([*argv, "--version"], env=env, capture_output=True, text=True,
                             timeout=60, check=True).stdout
    assert "hypercacheio" in version


def test_every_store_verb_names_its_directory(runner: CliRunner, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The one rule: --directory, else HYPERCACHEIO_SQLITE_PATH, else the XDG default; each
    verb says which on stderr."""
    d = str(tmp_path / "from-env")
    for args in (["install"], ["stats"], ["set", "k", "v"], ["get", "k"], ["delete", "k"],
                 ["purge"], ["clear", "--yes"]):
        code, _, err = run_out(runner, *args, env={"HYPERCACHEIO_SQLITE_PATH": d})
        assert f"storage: {d}\n" in err, (args, err)
    xdg = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    code, _, err = run_out(runner, "set", "k", "v")
    assert code == 0 and f"storage: {xdg / 'hypercacheio'}" in err
    assert Cache(str(xdg / "hypercacheio")).get("k") == "v"


def test_long_values_are_not_folded_in_a_pipe(runner: CliRunner, tmp_path: Path) -> None:
    """Without a terminal (CliRunner, a pipe) rich would wrap at 80 columns mid-word."""
    d = str(tmp_path / ("a-rather-long-directory-name-" * 4))
    key = "k-" + "x" * 150
    code, out, _ = run_out(runner, "set", "-d", d, key, "v")
    assert code == 0 and f"stored '{key}'" in out
    code, out, _ = run_out(runner, "install", "-d", d)
    assert code == 0 and d in out  # the path in one piece, in the table too
    proc = subprocess.run([sys.executable, "-m", "hypercacheio.cli", "set", "-d", d, key, "v"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and f"stored '{key}'\n" == proc.stdout
    assert f"storage: {d}\n" == proc.stderr


def test_import_does_not_load_the_http_client() -> None:
    code = ("import sys, hypercacheio\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('urllib3', 'httptools', 'aiohttp') or m.startswith('hypercacheio.node'))\n"
            "print(','.join(bad))\n"
            "assert hypercacheio.RemoteCache.__name__ == 'RemoteCache'\n"
            "assert 'hypercacheio.node.client' in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


def test_version_comes_from_the_package_metadata() -> None:
    from importlib.metadata import version

    import hypercacheio

    assert hypercacheio.__version__ == version("hypercacheio")
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert f'version = "{hypercacheio.__version__}"' in text
    source = Path(hypercacheio.__file__).read_text()
    assert f'__version__ = "{hypercacheio.__version__}"' not in source


def test_settings_to_env_round_trips(tmp_path: Path) -> None:
    from hypercacheio import Settings

    s = Settings(directory=str(tmp_path), prefix="p:", default_ttl=30, peer_addrs=("a:1", "b:2"),
                 api_token="tok-1234", allow_network_fs=True)
    env = s.to_env(environ={})
    assert Settings.from_env(env) == s
    assert "HYPERCACHEIO_MAX_BYTES" not in env  # None: absent
    assert "HYPERCACHEIO_API_TOKEN" not in s.to_env(token=False)
    default = Settings(directory=str(tmp_path))
    assert "HYPERCACHEIO_API_TOKEN" not in default.to_env(environ={})  # the node's own
    assert default.to_env(environ={"HYPERCACHEIO_API_TOKEN": "changeme"})[
        "HYPERCACHEIO_API_TOKEN"] == "changeme"


def test_one_api_path() -> None:
    """The literal lives in config.py only; everything else imports it."""
    src = Path(__file__).parents[1] / "src" / "hypercacheio"
    holders = sorted(str(p.relative_to(src)) for p in src.rglob("*.py")
                     if '"/api/hypercacheio' in p.read_text())
    assert holders == ["config.py"], holders


def test_the_library_follows_the_same_directory_rule(tmp_path: Path) -> None:
    """Cache() with no directory uses HYPERCACHEIO_SQLITE_PATH, as the CLI and the node do."""
    d = tmp_path / "shared"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPERCACHEIO_")}
    env.update(HYPERCACHEIO_SQLITE_PATH=str(d), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    code = ("from hypercacheio import Cache; c = Cache(); c.set('k', 'v'); "
            "print(c.settings.directory)")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(d)
    got = subprocess.run([sys.executable, "-m", "hypercacheio.cli", "get", "k"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert got.stdout == "v\n" and got.stderr == f"storage: {d}\n"
