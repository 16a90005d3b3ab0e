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
    result = runner.invoke(main, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.output


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
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600


def test_admin_verbs(runner: CliRunner, tmp_path: Path) -> None:
    d = str(tmp_path / "store")
    assert run(runner, "set", "-d", d, "greeting", "hello")[0] == 0
    assert run(runner, "set", "-d", d, "n", "41", "--type", "int")[0] == 0
    assert run(runner, "set", "-d", d, "doc", '{"a": [1]}', "--type", "json")[0] == 0
    assert run(runner, "get", "-d", d, "greeting") == (0, "hello\n")
    assert run(runner, "get", "-d", d, "doc") == (0, "{'a': [1]}\n")
    assert Cache(d).incr("n") == 42  # stored as an integer
    code, out = run(runner, "stats", "-d", d, "--json")
    assert code == 0 and json.loads(out)["entries"] == 3
    assert run(runner, "delete", "-d", d, "greeting")[0] == 0
    assert run(runner, "delete", "-d", d, "greeting")[0] == 1
    assert run(runner, "get", "-d", d, "greeting")[0] == 1
    assert run(runner, "clear", "-d", d, "--yes") == (0, "cleared\n")
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
