"""The ``hypercacheio`` command: arguments in, messages out; the work is in other modules.

``engine.py`` holds the store's verbs (install, stats, get, set, delete, clear, purge),
``node.py`` the node's (run, start, stop, restart, status), ``service.py`` the system
service's and ``check``; ``common.py`` what they share.

Exit codes: 0 done; 1 failed (a clear one-line reason on stderr; ``get``/``delete``: no such
key); 2 bad arguments; 3 not running (``node stop``/``node status``); the service verbs pass
the service manager's codes through (see the README).
"""

from __future__ import annotations

import click

from .engine import register as _register_engine
from .node import node_group
from .service import check_cmd, service_group
from .top import top_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hypercacheio", prog_name="hypercacheio")
def main() -> None:
    """hypercacheio: a cache shared by every process of a host and every server of a cluster."""


_register_engine(main)
main.add_command(node_group)
main.add_command(service_group)
main.add_command(check_cmd)
main.add_command(top_cmd)

__all__ = ["main"]
