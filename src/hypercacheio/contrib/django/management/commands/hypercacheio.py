"""``manage.py hypercacheio install|stats|check|node|top ...``: the CLI, configured from CACHES.

``install`` and ``stats`` run here against the alias's store. ``check``, ``node``, ``top`` (and any
other CLI command) run the ``hypercacheio`` command itself, with the alias's settings passed
as the ``HYPERCACHEIO_*`` variables it reads, so both tools always agree.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from django.conf import settings as django_settings
from django.core.cache import caches
from django.core.management.base import BaseCommand, CommandError, CommandParser

from hypercacheio.auth import TOKEN_VAR, token_display
from hypercacheio.config import Settings
from hypercacheio.contrib.django.backend import HyperCacheIOCache, settings_from_caches_entry
from hypercacheio.errors import HypercacheioError
from hypercacheio.store import DB_NAME

BACKEND_PATHS = (
    "hypercacheio.contrib.django.HyperCacheIOCache",
    "hypercacheio.contrib.django.backend.HyperCacheIOCache",
)
DELEGATED = ("check", "node", "top")


def hypercacheio_aliases(caches_setting: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The CACHES aliases served by this backend, "default" first."""
    names = [alias for alias, entry in caches_setting.items()
             if entry.get("BACKEND") in BACKEND_PATHS]
    return sorted(names, key=lambda alias: alias != "default")


def settings_env(settings: Settings) -> dict[str, str]:
    """The ``HYPERCACHEIO_*`` variables that reproduce ``settings`` for the CLI."""
    return settings.to_env()


@contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set variables for the duration of a delegated command, then restore them."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


class Command(BaseCommand):
    help = ("hypercacheio for this project's CACHES: install (create the store), stats, "
            "and the CLI's check, node and top commands.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--alias", default=None,
            help="CACHES alias to use (default: 'default', else the first hypercacheio one).")
        sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
        sub.add_parser("install", help="Create the storage directory and database; show them.")
        stats = sub.add_parser("stats", help="Entries, locks and sizes of the store.")
        stats.add_argument("--json", action="store_true", help="Print JSON.")
        for name in DELEGATED:
            delegated = sub.add_parser(
                name, help=f"Run `hypercacheio {name} ...` with this alias's settings.",
                add_help=False)
            delegated.add_argument("args", nargs=argparse.REMAINDER)

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        """Everything after ``check`` or ``node`` goes to the CLI untouched (even ``--help``,
        which argparse's REMAINDER would otherwise take as its own)."""
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        parse = parser.parse_args

        def parse_args(args: list[str] | None = None, namespace: Any = None) -> Any:
            given = list(sys.argv[2:] if args is None else args)
            for i, arg in enumerate(given):
                if arg in DELEGATED and (i == 0 or given[i - 1] != "--alias"):
                    parsed = parse(given[:i + 1], namespace)
                    parsed.args = given[i + 1:]
                    return parsed
            return parse(given, namespace)

        parser.parse_args = parse_args
        return parser

    def handle(self, *args: Any, **options: Any) -> None:
        alias = self._alias(options["alias"])
        action = options["action"]
        if action == "install":
            self._install(alias)
        elif action == "stats":
            self._stats(alias, options["json"])
        else:
            self._delegate(alias, action, list(args))  # Django passes "args" positionally

    # ---- actions ------------------------------------------------------------------------

    def _alias(self, given: str | None) -> str:
        setting = django_settings.CACHES
        if given is not None:
            if given not in setting:
                raise CommandError(f"no cache alias {given!r} in CACHES "
                                   f"(aliases: {', '.join(setting)})")
            return given
        ours = hypercacheio_aliases(setting)
        if not ours:
            raise CommandError("no CACHES entry uses hypercacheio; set BACKEND to "
                               f"{BACKEND_PATHS[0]!r}")
        return ours[0]

    def _backend(self, alias: str) -> HyperCacheIOCache:
        try:
            backend = caches[alias]
        except HypercacheioError as exc:
            raise CommandError(f"CACHES[{alias!r}]: {exc}") from exc
        if not isinstance(backend, HyperCacheIOCache):
            raise CommandError(f"CACHES[{alias!r}] is not a hypercacheio cache "
                               f"(BACKEND {django_settings.CACHES[alias].get('BACKEND')!r})")
        return backend

    def _settings(self, alias: str) -> Settings:
        entry = django_settings.CACHES[alias]
        return settings_from_caches_entry(entry.get("LOCATION"), entry)

    def _install(self, alias: str) -> None:
        settings = self._settings(alias)
        existed = os.path.exists(os.path.join(settings.directory, DB_NAME))
        figures = self._backend(alias).engine.store.stats()
        verb = "exists" if existed else "created"
        self.stdout.write(self.style.SUCCESS(
            f"CACHES[{alias!r}]: database {verb}: {figures['path']} "
            f"(node id {figures['node_id']})"))
        for name, value in settings.to_env(token=False).items():
            self.stdout.write(f"  {name}={value}")
        self.stdout.write(f"  {TOKEN_VAR}={token_display(settings)}")

    def _stats(self, alias: str, as_json: bool) -> None:
        figures = self._backend(alias).engine.store.stats()
        if as_json:
            self.stdout.write(json.dumps(figures, indent=2))
            return
        width = max(len(name) for name in figures)
        self.stdout.write(f"CACHES[{alias!r}] storage: {self._settings(alias).directory}")
        for name, value in figures.items():
            self.stdout.write(f"  {name.ljust(width)}  {value}")

    def _delegate(self, alias: str, action: str, rest: list[str]) -> None:
        import click

        from hypercacheio import cli

        group = cli.main
        if not isinstance(group, click.Group) or action not in group.commands:
            raise CommandError(f"`hypercacheio {action}` is not available in this "
                               "version of hypercacheio")
        with environment(settings_env(self._settings(alias))):
            try:
                group.main(args=[action, *rest], prog_name="manage.py hypercacheio",
                           standalone_mode=False)
            except click.exceptions.Exit as exc:
                if exc.exit_code:
                    raise CommandError(f"hypercacheio {action} exited with status "
                                       f"{exc.exit_code}", returncode=exc.exit_code) from exc
            except click.Abort as exc:
                raise CommandError("aborted") from exc
            except click.ClickException as exc:
                raise CommandError(exc.format_message(), returncode=exc.exit_code) from exc
