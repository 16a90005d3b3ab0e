"""Service files (systemd unit, launchd plist) and the service verbs against stand-in tools."""

from __future__ import annotations

import os
import plistlib
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hypercacheio.cli import main
from hypercacheio.config import Settings
from hypercacheio.node.options import NodeOptions
from hypercacheio.ops import service as svc
from node_helpers import free_port, wait_until

TOKEN = 'tok-%h"quote\\back$HOME'  # every character systemd would otherwise interpret
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No HYPERCACHEIO_* variable of the outer shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("HYPERCACHEIO_"):
            monkeypatch.delenv(name)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(directory=str(tmp_path / "data"), api_token=TOKEN, node_port=8123,
                    peer_addrs=("10.0.0.2:7400", "10.0.0.3:7400"),
                    secondary_urls=("http://b:1/api",))


def norm(text: str) -> str:
    return " ".join(text.split())


# --- the files ----------------------------------------------------------------------------


def test_detect_kind() -> None:
    assert svc.detect_kind("linux") == "systemd"
    assert svc.detect_kind("darwin") == "launchd"
    with pytest.raises(svc.ServiceError, match="Linux .*macOS"):
        svc.detect_kind("win32")


def test_environment_carries_every_setting_and_round_trips(settings: Settings) -> None:
    environ = {"HYPERCACHEIO_FUTURE_OPTION": "x", "HYPERCACHEIO_GO_PORT": "1", "PATH": "/x",
               "HYPERCACHEIO_NODE_GC_INTERVAL": "7", "HYPERCACHEIO_NODE_LOG_LEVEL": "debug"}
    env = svc.service_environment(settings, environ=environ)
    assert env["HYPERCACHEIO_FUTURE_OPTION"] == "x"  # unknown to Settings, still carried
    assert "HYPERCACHEIO_GO_PORT" not in env  # an alias: its value is already resolved
    assert "PATH" not in env
    assert Settings.from_env(env) == settings
    assert NodeOptions.from_env(env) == NodeOptions.from_env(environ)
    assert env["HYPERCACHEIO_NODE_LOG_LEVEL"] == "DEBUG"
    assert "HYPERCACHEIO_NODE_PID_FILE" not in env  # None: the node's default


def test_default_token_is_left_to_the_node(settings: Settings) -> None:
    """With no token configured, the node uses the one it generated for its directory."""
    unset = settings.replace(api_token="changeme")
    assert "HYPERCACHEIO_API_TOKEN" not in svc.service_environment(unset, environ={})
    explicit = svc.service_environment(unset, environ={"HYPERCACHEIO_API_TOKEN": "changeme"})
    assert explicit["HYPERCACHEIO_API_TOKEN"] == "changeme"


def test_line_break_in_a_value_is_refused(settings: Settings) -> None:
    with pytest.raises(svc.ServiceError, match="HYPERCACHEIO_PREFIX.*line break"):
        svc.service_environment(settings.replace(prefix="a\nb"), environ={})


def test_launchd_plist(settings: Settings, tmp_path: Path) -> None:
    spec = svc.build_spec(settings, kind="launchd", environ={})
    path = svc.write_service_file(spec, tmp_path)
    assert path.name == "io.hypercacheio.node.plist"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    job = plistlib.loads(path.read_bytes())
    assert job["Label"] == "io.hypercacheio.node"
    assert job["ProgramArguments"] == [os.path.abspath(sys.executable), "-m",
                                       "hypercacheio.cli", "node", "run", "--quiet"]
    assert job["RunAtLoad"] is True
    assert job["KeepAlive"] == {"SuccessfulExit": False}
    assert job["StandardOutPath"].startswith(settings.directory)
    assert job["StandardErrorPath"].startswith(settings.directory)
    assert os.path.isdir(settings.directory)  # launchd opens the logs before the node runs
    env = job["EnvironmentVariables"]
    assert env["HYPERCACHEIO_API_TOKEN"] == TOKEN
    assert env["HYPERCACHEIO_NODE_PORT"] == "8123"
    assert Settings.from_env(env) == settings
    assert "UserName" not in job  # a user agent runs as its user


def test_launchd_system_daemon_names_its_user(settings: Settings) -> None:
    spec = svc.build_spec(settings, kind="launchd", scope="system", run_as="cache",
                          environ={})
    assert plistlib.loads(svc.render_launchd_plist(spec))["UserName"] == "cache"


def unquote_systemd(word: str) -> str:
    """Undo the quoting of one double-quoted systemd word (the subset render uses)."""
    assert word.startswith('"') and word.endswith('"'), word
    out, i, body = [], 0, word[1:-1]
    while i < len(body):
        c = body[i]
        if c == "\\":
            out.append(body[i + 1])
            i += 2
        elif c == "%":
            assert body[i + 1] == "%", body
            out.append("%")
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def unit_environment(text: str) -> dict[str, str]:
    env = {}
    for line in text.splitlines():
        if line.startswith("Environment="):
            name, _, value = unquote_systemd(line[len("Environment="):]).partition("=")
            env[name] = value
    return env


def test_systemd_unit_text(settings: Settings) -> None:
    spec = svc.build_spec(settings, kind="systemd", scope="system", run_as="cache", environ={})
    text = svc.render_systemd_unit(spec)
    assert "Restart=always" in text
    assert "User=cache" in text
    assert "WantedBy=multi-user.target" in text
    exec_line = next(ln for ln in text.splitlines() if ln.startswith("ExecStart="))
    assert exec_line.split("=", 1)[1].split(" ")[0] == f'"{os.path.abspath(sys.executable)}"'
    env = unit_environment(text)
    assert env["HYPERCACHEIO_API_TOKEN"] == TOKEN
    assert Settings.from_env(env) == settings


def test_systemd_user_unit(settings: Settings) -> None:
    text = svc.render_systemd_unit(svc.build_spec(settings, kind="systemd", scope="user",
                                                  environ={}))
    assert "WantedBy=default.target" in text
    assert "User=" not in text


def test_env_file_keeps_the_token_out_of_the_unit(settings: Settings, tmp_path: Path) -> None:
    env_file = tmp_path / "secret" / "hypercacheio.env"
    spec = svc.build_spec(settings, kind="systemd", env_file=str(env_file), environ={})
    path = svc.write_service_file(spec, tmp_path / "unit.service")
    text = path.read_text()
    assert "HYPERCACHEIO_API_TOKEN" not in text
    assert f"EnvironmentFile={env_file}\n" in text
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert env_file.read_text().startswith("HYPERCACHEIO_API_TOKEN=")
    with pytest.raises(svc.ServiceError, match="systemd feature"):
        svc.build_spec(settings, kind="launchd", env_file=str(env_file), environ={})


def test_bad_python_is_refused(settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "python").write_text("")
    with pytest.raises(svc.ServiceError, match="not an executable Python"):
        svc.build_spec(settings, kind="systemd", python=str(tmp_path / "python"), environ={})


@pytest.fixture(scope="module")
def systemd_analyze(tmp_path_factory: pytest.TempPathFactory) -> str:
    """``systemd-analyze``, once it has shown that it verifies a trivial unit here."""
    if SYSTEMD_ANALYZE is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    probe = tmp_path_factory.mktemp("probe") / "probe.service"
    probe.write_text("[Service]\nExecStart=/bin/true\n")
    try:
        proc = subprocess.run([SYSTEMD_ANALYZE, "verify", str(probe)], capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"systemd-analyze cannot run in this container: {exc}")
    if proc.returncode != 0:
        pytest.skip("systemd-analyze cannot verify even a trivial unit in this container "
                    f"(exit {proc.returncode}): {proc.stderr.strip()[:300]}")
    return SYSTEMD_ANALYZE


def verify(analyze: str, path: Path) -> None:
    proc = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True,
                          timeout=60)
    ours = [ln for ln in (proc.stdout + proc.stderr).splitlines() if path.name in ln]
    assert proc.returncode == 0 and not ours, proc.stdout + proc.stderr


@pytest.mark.parametrize("scope", svc.SCOPES)
def test_systemd_analyze_verifies_the_unit(systemd_analyze: str, settings: Settings,
                                           tmp_path: Path, scope: str) -> None:
    spec = svc.build_spec(settings, kind="systemd", scope=scope, run_as="root", environ={})
    verify(systemd_analyze, svc.write_service_file(spec, tmp_path))


def test_systemd_analyze_verifies_awkward_paths(systemd_analyze: str, settings: Settings,
                                                tmp_path: Path) -> None:
    """An interpreter path with a space, a percent and a dollar stays one literal word."""
    odd = tmp_path / "my venv %i $X" / "bin"
    odd.mkdir(parents=True)
    (odd / "python").symlink_to(sys.executable)
    spec = svc.build_spec(settings, kind="systemd", python=str(odd / "python"),
                          env_file=str(tmp_path / "tok.env"), environ={})
    path = svc.write_service_file(spec, tmp_path / "hypercacheio-node.service")
    verify(systemd_analyze, path)
    exec_line = next(ln for ln in path.read_text().splitlines() if ln.startswith("ExecStart="))
    assert unquote_systemd(exec_line[len("ExecStart="):].split('" "')[0] + '"') == str(
        odd / "python")


def exec_words(text: str) -> list[str]:
    """The words of the unit's ExecStart= line, unquoted (arguments: ``$$`` -> ``$``)."""
    line = next(ln for ln in text.splitlines() if ln.startswith("ExecStart="))
    words = [unquote_systemd(m.group(0)) for m in re.finditer(r'"(?:[^"\\]|\\.)*"', line)]
    return words[:1] + [w.replace("$$", "$") for w in words[1:]]


def test_the_unit_runs_a_working_node(tmp_path: Path) -> None:
    """ExecStart= and Environment= of a generated unit, run as systemd would run them, start
    a node that the connectivity check passes against with the same (awkward) token."""
    port = free_port()
    settings = Settings(directory=str(tmp_path / "data"), api_token=TOKEN, node_port=port,
                        server_type="node")
    text = svc.render_systemd_unit(svc.build_spec(settings, kind="systemd", scope="user",
                                                  environ={}))
    env = {"PATH": os.environ.get("PATH", ""), **unit_environment(text)}
    proc = subprocess.Popen(exec_words(text), env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def answers() -> bool:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        assert wait_until(answers, timeout=20)
        check = subprocess.run([sys.executable, "-m", "hypercacheio.cli", "check"],
                               env={**env, "COLUMNS": "200"}, capture_output=True, text=True,
                               timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        assert TOKEN not in check.stdout + check.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0].decode(errors="replace")
    assert proc.returncode == 0, output
    assert TOKEN not in output  # --quiet: no banner in the journal


# --- the make command ---------------------------------------------------------------------


def test_make_command_writes_and_never_prints_the_token(tmp_path: Path) -> None:
    runner = CliRunner()
    env = {"HYPERCACHEIO_API_TOKEN": "very-secret-token", "HYPERCACHEIO_NODE_PORT": "9001"}
    result = runner.invoke(main, ["service", "make", "--kind", "systemd", "-o", str(tmp_path),
                                  "-d", str(tmp_path / "data")], env=env)
    assert result.exit_code == 0, result.output
    assert "very-secret-token" not in result.output
    unit = tmp_path / "hypercacheio-node.service"
    assert "wrote" in result.output and str(unit) in norm(result.output)
    assert unit_environment(unit.read_text())["HYPERCACHEIO_NODE_PORT"] == "9001"
    assert "sudo cp" in result.output

    result = runner.invoke(main, ["service", "make", "--kind", "launchd", "--install",
                                  "--unit-dir", str(tmp_path / "agents"),
                                  "-d", str(tmp_path / "data")], env=env)
    assert result.exit_code == 0, result.output
    job = plistlib.loads((tmp_path / "agents" / "io.hypercacheio.node.plist").read_bytes())
    assert job["EnvironmentVariables"]["HYPERCACHEIO_API_TOKEN"] == "very-secret-token"
    assert "very-secret-token" not in result.output


def test_make_command_reports_an_unwritable_output(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = CliRunner().invoke(main, ["service", "make", "--kind", "systemd",
                                       "-o", str(blocker / "sub" / "x.service"),
                                       "-d", str(tmp_path / "data")])
    assert result.exit_code == 1
    assert "cannot write" in result.output


# --- the verbs against stand-in tools -----------------------------------------------------


@pytest.fixture
def fake_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``systemctl`` and ``launchctl`` stand-ins first on PATH; they append their arguments
    to ``calls.txt`` and exit with ``$FAKE_RC`` (0 by default)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "calls.txt"
    for tool in ("systemctl", "launchctl"):
        script = bindir / tool
        script.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{record}"\n'
                          'if [ "${FAKE_RC:-0}" != 0 ]; then echo "stand-in failure" >&2; fi\n'
                          'exit "${FAKE_RC:-0}"\n')
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    return record


def calls(record: Path) -> list[str]:
    return record.read_text().splitlines() if record.exists() else []


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["service", *args], env=env)
    return result.exit_code, norm(result.output)


UNIT = "hypercacheio-node.service"


@pytest.mark.parametrize(("verb", "expected"), [
    ("start", ["systemctl daemon-reload", f"systemctl enable --now {UNIT}"]),
    ("stop", [f"systemctl stop {UNIT}"]),
    ("restart", [f"systemctl restart {UNIT}"]),
    ("status", [f"systemctl status --no-pager --lines=10 {UNIT}"]),
    ("remove", [f"systemctl disable --now {UNIT}", "systemctl daemon-reload"]),
])
def test_systemctl_verbs(fake_tools: Path, tmp_path: Path, verb: str,
                         expected: list[str]) -> None:
    code, out = invoke(verb, "--kind", "systemd", "--scope", "system",
                       "--unit-dir", str(tmp_path))
    assert code == 0, out
    assert calls(fake_tools) == expected


def test_systemctl_user_scope_and_remove_deletes_the_unit(fake_tools: Path,
                                                         tmp_path: Path) -> None:
    unit = tmp_path / UNIT
    unit.write_text("[Service]\n")
    code, out = invoke("remove", "--kind", "systemd", "--scope", "user",
                       "--unit-dir", str(tmp_path))
    assert code == 0, out
    assert calls(fake_tools) == [f"systemctl --user disable --now {UNIT}",
                                 "systemctl --user daemon-reload"]
    assert not unit.exists()
    assert "removed" in out


def test_systemctl_failure_is_reported(fake_tools: Path, tmp_path: Path) -> None:
    code, out = invoke("start", "--kind", "systemd", "--unit-dir", str(tmp_path),
                       env={"FAKE_RC": "1"})
    assert code == svc.EXIT_TOOL_FAILED
    assert "stand-in failure" in out
    assert "`systemctl daemon-reload` failed with exit code 1" in out
    assert calls(fake_tools) == ["systemctl daemon-reload"]  # stopped at the first failure


@pytest.mark.parametrize(("rc", "message"), [("3", "is not running"),
                                             ("4", "is not installed")])
def test_systemctl_status_passes_its_exit_code_through(fake_tools: Path, tmp_path: Path,
                                                       rc: str, message: str) -> None:
    code, out = invoke("status", "--kind", "systemd", "--unit-dir", str(tmp_path),
                       env={"FAKE_RC": rc})
    assert code == int(rc)
    assert message in out


def test_missing_tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    for kind, tool in (("systemd", "systemctl"), ("launchd", "launchctl")):
        code, out = invoke("stop", "--kind", kind, "--unit-dir", str(tmp_path))
        assert code == svc.EXIT_TOOL_MISSING
        assert f"`{tool}` was not found on PATH" in out


def test_launchctl_verbs(fake_tools: Path, tmp_path: Path) -> None:
    target = f"gui/{os.getuid()}/io.hypercacheio.node"
    plist = tmp_path / "io.hypercacheio.node.plist"
    common = ("--kind", "launchd", "--scope", "user", "--unit-dir", str(tmp_path))

    code, out = invoke("start", *common)
    assert code == svc.EXIT_NOT_INSTALLED
    assert "does not exist" in out and "service make --install" in out
    assert calls(fake_tools) == []

    plist.write_bytes(plistlib.dumps({"Label": "io.hypercacheio.node"}))
    for verb in ("start", "restart", "status", "stop", "remove"):
        code, out = invoke(verb, *common)
        assert code == 0, (verb, out)
    assert calls(fake_tools) == [
        f"launchctl enable {target}",
        f"launchctl bootstrap gui/{os.getuid()} {plist}",
        f"launchctl kickstart -k {target}",
        f"launchctl print {target}",
        f"launchctl bootout {target}",
        f"launchctl bootout {target}",
        f"launchctl disable {target}",
    ]
    assert not plist.exists()


def test_launchctl_failure_is_reported(fake_tools: Path, tmp_path: Path) -> None:
    code, out = invoke("restart", "--kind", "launchd", "--scope", "system",
                       "--unit-dir", str(tmp_path), env={"FAKE_RC": "1"})
    assert code == svc.EXIT_TOOL_FAILED
    assert "`launchctl kickstart -k system/io.hypercacheio.node` failed with exit code 1" in out
    code, out = invoke("status", "--kind", "launchd", "--unit-dir", str(tmp_path),
                       env={"FAKE_RC": "1"})
    assert code == 3
    assert "is not loaded" in out


def test_make_says_the_file_holds_the_token_only_when_it_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("HYPERCACHEIO_"):
            monkeypatch.delenv(name)
    runner = CliRunner()
    args = ["service", "make", "--kind", "systemd", "-d", str(tmp_path / "data")]
    without = runner.invoke(main, [*args, "-o", str(tmp_path / "a.service")])
    assert without.exit_code == 0, without.output
    assert "contains HYPERCACHEIO_API_TOKEN" not in without.output
    assert "No API token in it" in without.output and "node.token" in without.output
    text = (tmp_path / "a.service").read_text()
    assert "HYPERCACHEIO_API_TOKEN" not in text and "holds the API token" not in text
    with_token = runner.invoke(main, [*args, "-o", str(tmp_path / "b.service")],
                               env={"HYPERCACHEIO_API_TOKEN": "tok-5678-long"})
    assert "It contains HYPERCACHEIO_API_TOKEN" in with_token.output
    assert "holds the API token" in (tmp_path / "b.service").read_text()
    in_env_file = runner.invoke(main, [*args, "-o", str(tmp_path / "c.service"),
                                       "--env-file", str(tmp_path / "node.env")],
                                env={"HYPERCACHEIO_API_TOKEN": "tok-5678-long"})
    assert "It contains" not in in_env_file.output and "node.env" in in_env_file.output
    assert "holds the API token" not in (tmp_path / "c.service").read_text()


def test_every_writer_of_settings_variables_is_settings_to_env(settings: Settings,
                                                               tmp_path: Path) -> None:
    """Service files, `node start`'s child and Django's command carry the same variables."""
    from hypercacheio.contrib.django.management.commands.hypercacheio import settings_env
    from hypercacheio.node.supervise import child_env

    expected = settings.to_env(environ={})
    service = svc.service_environment(settings, environ={})
    assert {k: service[k] for k in expected} == expected
    child = child_env(settings, NodeOptions(), str(tmp_path / "node.log"))
    assert {k: child[k] for k in settings.to_env(token=False)} == settings.to_env(token=False)
    assert child["HYPERCACHEIO_NODE_PID_FILE"] == str(Path(settings.directory) / "node.pid")
    assert child["HYPERCACHEIO_NODE_LOG_FILE"] == str(tmp_path / "node.log")
    assert settings_env(settings) == settings.to_env()
