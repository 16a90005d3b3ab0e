"""Firewall advice for a port that did not answer: the commands of this host's kind of system.

``ufw`` on the Debian family, ``firewalld`` on the RHEL family (found from ``/etc/os-release``),
the application firewall on macOS, and generic iptables/nft lines elsewhere. Used by the
connectivity check (``ops/check.py``).
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Iterable, Mapping

OS_RELEASE = "/etc/os-release"
DEBIAN_LIKE = {"debian", "ubuntu", "linuxmint", "raspbian", "pop", "elementary", "kali"}
RHEL_LIKE = {"rhel", "fedora", "centos", "rocky", "almalinux", "ol", "amzn", "scientific"}
SOCKETFILTERFW = "/usr/libexec/ApplicationFirewall/socketfilterfw"


def read_os_release(path: str = OS_RELEASE) -> dict[str, str]:
    """``/etc/os-release`` as a dict (empty if it cannot be read)."""
    out: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                name, sep, value = line.strip().partition("=")
                if sep and not name.startswith("#"):
                    out[name] = value.strip().strip('"').strip("'")
    except OSError:
        pass
    return out


def firewall_family(system: str | None = None, os_release: Mapping[str, str] | None = None) -> str:
    """``ufw`` (Debian family), ``firewalld`` (RHEL family), ``socketfilterfw`` (macOS) or
    ``generic``."""
    system = platform.system() if system is None else system
    if system == "Darwin":
        return "socketfilterfw"
    if system != "Linux":
        return "generic"
    release = read_os_release() if os_release is None else os_release
    ids = {release.get("ID", "").lower(), *release.get("ID_LIKE", "").lower().split()}
    if ids & DEBIAN_LIKE:
        return "ufw"
    if ids & RHEL_LIKE:
        return "firewalld"
    return "generic"


def firewall_advice(ports: Iterable[int], *, family: str | None = None,
                    python: str | None = None) -> list[str]:
    """Commands that open ``ports`` (TCP) on a host of this host's kind of system."""
    family = family or firewall_family()
    ports = sorted(set(ports))
    lines: list[str] = []
    if family == "ufw":
        lines.append("Debian/Ubuntu (ufw): on the host that did not answer, allow the port:")
        for port in ports:
            lines.append(f"  sudo ufw allow {port}/tcp")
        lines.append("  sudo ufw status verbose")
    elif family == "firewalld":
        lines.append("RHEL/Fedora (firewalld): on the host that did not answer, open the port:")
        for port in ports:
            lines.append(f"  sudo firewall-cmd --permanent --add-port={port}/tcp")
        lines.append("  sudo firewall-cmd --reload")
        lines.append("  sudo firewall-cmd --list-ports")
    elif family == "socketfilterfw":
        exe = python or sys.executable
        lines.append("macOS (application firewall): allow incoming connections to Python:")
        lines.append(f"  sudo {SOCKETFILTERFW} --getglobalstate")
        lines.append(f"  sudo {SOCKETFILTERFW} --add {exe}")
        lines.append(f"  sudo {SOCKETFILTERFW} --unblockapp {exe}")
    else:
        lines.append("Open the port in the firewall of the host that did not answer, e.g.:")
        for port in ports:
            lines.append(f"  sudo iptables -I INPUT -p tcp --dport {port} -j ACCEPT")
            lines.append(f"  sudo nft add rule inet filter input tcp dport {port} accept")
    lines.append("Also check that the node runs there (`hypercacheio node status`) and listens "
                 "on an address this host can reach (HYPERCACHEIO_NODE_LISTEN_HOST, not "
                 "127.0.0.1 for remote clients).")
    return lines
