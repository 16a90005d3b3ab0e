"""The verbs of a node service: ``start|stop|restart|status|remove`` drive ``systemctl`` or
``launchctl`` through :func:`subprocess.run` and report what the tool said and why it failed.

The service files they act on are made by ``service.py``. Nothing here prints; the CLI
(``cli/service.py``) turns results into messages.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .service import (
    DEFAULT_SCOPE,
    EXIT_NOT_INSTALLED,
    EXIT_OK,
    EXIT_TOOL_FAILED,
    EXIT_TOOL_MISSING,
    KINDS,
    LAUNCHD_LABEL,
    SCOPES,
    SERVICE_NAME,
    ServiceError,
    detect_kind,
    file_name,
    install_dir,
)


@dataclass
class Step:
    """One command run by a verb and what it answered."""

    argv: list[str]
    returncode: int
    output: str


@dataclass
class VerbResult:
    """What a verb did: the commands, the exit code to return, and a one-line message."""

    verb: str
    exit_code: int
    message: str
    steps: list[Step] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exit_code == EXIT_OK

    @property
    def output(self) -> str:
        return "".join(s.output for s in self.steps)


class ServiceManager:
    """Drives one service manager (``systemctl`` or ``launchctl``) for the hypercacheio node."""

    tool = ""
    kind = ""
    verbs = ("start", "stop", "restart", "status", "remove")

    def __init__(self, scope: str, directory: str | os.PathLike[str] | None = None,
                 timeout: float = 60.0) -> None:
        if scope not in SCOPES:
            raise ServiceError(f"scope must be one of {SCOPES}, got {scope!r}")
        self.scope = scope
        self.directory = Path(directory) if directory else install_dir(self.kind, scope)
        self.timeout = timeout

    @property
    def installed_path(self) -> Path:
        return self.directory / file_name(self.kind)

    def _base(self) -> list[str]:
        return [self.tool]

    def run(self, verb: str) -> VerbResult:
        """Run ``verb``; never raises for a missing or failing tool (see the exit code)."""
        if verb not in self.verbs:
            raise ServiceError(f"verb must be one of {self.verbs}, got {verb!r}")
        if shutil.which(self.tool) is None:
            return VerbResult(verb, EXIT_TOOL_MISSING,
                              f"`{self.tool}` was not found on PATH: this host does not run "
                              f"{self.kind}. Use `hypercacheio node start` instead, or run this "
                              f"on a host managed by {self.kind}.")
        method = getattr(self, f"_{verb}")
        result: VerbResult = method()
        return result

    def _call(self, result: VerbResult, *args: str) -> Step:
        argv = [*self._base(), *args]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout,
                                  check=False)
            step = Step(argv, proc.returncode, (proc.stdout or "") + (proc.stderr or ""))
        except OSError as exc:
            step = Step(argv, 127, f"{argv[0]}: {exc.strerror}\n")
        except subprocess.TimeoutExpired:
            step = Step(argv, 124, f"{' '.join(argv)}: no answer within {self.timeout:g} s\n")
        result.steps.append(step)
        return step

    def _sequence(self, verb: str, done: str, *commands: Sequence[str],
                  tolerate: Sequence[int] = ()) -> VerbResult:
        """Run ``commands`` in order, stopping at the first failure (except ``tolerate``)."""
        result = VerbResult(verb, EXIT_OK, done)
        for i, args in enumerate(commands):
            step = self._call(result, *args)
            if step.returncode != 0 and i not in tolerate:
                result.exit_code = EXIT_TOOL_FAILED
                result.message = (f"`{' '.join(step.argv)}` failed with exit code "
                                  f"{step.returncode}{self._hint(verb)}")
                break
        return result

    def _hint(self, verb: str) -> str:
        return ""

    def _unlink(self, result: VerbResult, hint: str = "") -> bool:
        """Remove the installed file (gone already is fine); False, with ``result`` failed,
        when it cannot be removed."""
        try:
            self.installed_path.unlink(missing_ok=True)
        except OSError as exc:
            result.exit_code = EXIT_TOOL_FAILED
            result.message = f"cannot remove {self.installed_path}: {exc.strerror}{hint}"
            return False
        return True


class SystemdManager(ServiceManager):
    """``systemctl`` (with ``--user`` for the user scope) on ``hypercacheio-node.service``."""

    tool = "systemctl"
    kind = "systemd"

    def _base(self) -> list[str]:
        return [self.tool, "--user"] if self.scope == "user" else [self.tool]

    @property
    def unit(self) -> str:
        return f"{SERVICE_NAME}.service"

    def _hint(self, verb: str) -> str:
        hint = "; run it with sudo" if self.scope == "system" and os.geteuid() != 0 else ""
        if verb in ("start", "restart"):
            hint += (f"; is {self.installed_path} installed (`hypercacheio service make "
                     "--install`)? `journalctl -u hypercacheio-node` shows why the node stopped")
        return hint

    def _start(self) -> VerbResult:
        return self._sequence("start", f"{self.unit} enabled and started",
                              ("daemon-reload",), ("enable", "--now", self.unit))

    def _stop(self) -> VerbResult:
        return self._sequence("stop", f"{self.unit} stopped", ("stop", self.unit))

    def _restart(self) -> VerbResult:
        return self._sequence("restart", f"{self.unit} restarted", ("restart", self.unit))

    def _status(self) -> VerbResult:
        result = VerbResult("status", EXIT_OK, f"{self.unit} is running")
        step = self._call(result, "status", "--no-pager", "--lines=10", self.unit)
        # systemctl's own codes: 0 running, 3 not running, 4 no such unit.
        result.exit_code = step.returncode
        if step.returncode == 3:
            result.message = f"{self.unit} is not running"
        elif step.returncode == 4:
            result.message = (f"{self.unit} is not installed; run `hypercacheio service make "
                              "--install`")
        elif step.returncode != 0:
            result.message = f"`{' '.join(step.argv)}` failed with exit code {step.returncode}"
        return result

    def _remove(self) -> VerbResult:
        result = self._sequence("remove", f"{self.unit} stopped, disabled and removed",
                                ("disable", "--now", self.unit), tolerate=(0,))
        if not self._unlink(result, self._hint("")):
            return result
        step = self._call(result, "daemon-reload")
        if step.returncode != 0:
            result.exit_code = EXIT_TOOL_FAILED
            result.message = f"`{' '.join(step.argv)}` failed with exit code {step.returncode}"
        return result


class LaunchdManager(ServiceManager):
    """``launchctl`` bootstrap/bootout/kickstart/print on the ``io.hypercacheio.node`` job."""

    tool = "launchctl"
    kind = "launchd"

    @property
    def domain(self) -> str:
        return "system" if self.scope == "system" else f"gui/{os.getuid()}"

    @property
    def target(self) -> str:
        return f"{self.domain}/{LAUNCHD_LABEL}"

    def _not_installed(self, verb: str) -> VerbResult:
        return VerbResult(verb, EXIT_NOT_INSTALLED,
                          f"{self.installed_path} does not exist; run `hypercacheio service make "
                          "--install` first")

    def _hint(self, verb: str) -> str:
        hint = "; run it with sudo" if self.scope == "system" and os.geteuid() != 0 else ""
        if verb == "start":
            hint += f" (already loaded? try `hypercacheio service restart`; see {self.target})"
        return hint

    def _start(self) -> VerbResult:
        if not self.installed_path.exists():
            return self._not_installed("start")
        return self._sequence("start", f"{LAUNCHD_LABEL} loaded and started",
                              ("enable", self.target),
                              ("bootstrap", self.domain, str(self.installed_path)))

    def _stop(self) -> VerbResult:
        # bootout, not `launchctl stop`: with KeepAlive, launchd would start it again at once.
        return self._sequence("stop", f"{LAUNCHD_LABEL} stopped (unloaded)",
                              ("bootout", self.target))

    def _restart(self) -> VerbResult:
        return self._sequence("restart", f"{LAUNCHD_LABEL} restarted",
                              ("kickstart", "-k", self.target))

    def _status(self) -> VerbResult:
        result = VerbResult("status", EXIT_OK, f"{LAUNCHD_LABEL} is loaded")
        step = self._call(result, "print", self.target)
        if step.returncode != 0:
            result.exit_code = 3
            result.message = f"{LAUNCHD_LABEL} is not loaded"
        return result

    def _remove(self) -> VerbResult:
        result = self._sequence("remove", f"{LAUNCHD_LABEL} unloaded, disabled and removed",
                                ("bootout", self.target), ("disable", self.target),
                                tolerate=(0,))
        if result.ok:
            self._unlink(result)
        return result


def manager_for(kind: str | None = None, scope: str | None = None,
                directory: str | os.PathLike[str] | None = None) -> ServiceManager:
    """The manager for this platform (or ``kind``), in ``scope`` (default per platform)."""
    kind = kind or detect_kind()
    if kind not in KINDS:
        raise ServiceError(f"kind must be one of {KINDS}, got {kind!r}")
    scope = scope or DEFAULT_SCOPE[kind]
    cls: type[ServiceManager] = SystemdManager if kind == "systemd" else LaunchdManager
    return cls(scope, directory)
