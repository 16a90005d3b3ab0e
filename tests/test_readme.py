"""Every code block of the README runs when pasted.

The README is read at test time, so the test follows every edit. ```python blocks run in a
fresh interpreter each (with a few names an example assumes, like ``build_report``, defined
first); ```bash blocks run with ``bash -e`` and the ``hypercacheio`` of this environment.
Both use a temporary storage directory (``HYPERCACHEIO_SQLITE_PATH``) next to a node the test
starts there; a block that starts and stops a node itself gets a directory and port of its
own. A block that cannot run here says why: a ``<!-- readme-test: skip (reason) -->`` line
just above it, or an entry in ``SKIPPED`` below (for sections whose text cannot carry one).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from node_helpers import free_port, wait_until

pytestmark = pytest.mark.timeout(120)

README = Path(__file__).parents[1] / "README.md"
TOKEN = "readme-test-token-4b1d0c9e"
MARKER = re.compile(r"<!--\s*readme-test:\s*skip\b\s*(.*?)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")

SKIPPED: dict[str, str] = {
    # a substring of the block -> why it does not run here
    "pip install '": "installs packages (the test runs in the environment it has)",
    "python manage.py hypercacheio": "needs a Django project; tests/test_django_backend.py "
                                     "runs these commands",
    "tests/test_django_suite.py": "downloads Django's test suite; a test of its own",
    "hypercacheio node run ": "runs in the foreground until Ctrl-C; the other verbs run in "
                              "the Command line section's block",
    "sudo hypercacheio service": "needs root and systemd/launchd; tests/test_service.py runs "
                                 "the verbs against stand-in tools",
}

PRELUDE = f'''
import os
def build_report():
    return {{"rows": 3}}
def run_import(fence=None):
    assert fence is not None
def run_job():
    pass
token = {TOKEN!r}
owner = "owner-from-another-process"  # restore_lock(name, owner) examples
'''

DJANGO_PRELUDE = '''
import django
from django.conf import settings as _settings
if not _settings.configured:
    _settings.configure(CACHES={"default": {
        "BACKEND": "hypercacheio.contrib.django.HyperCacheIOCache"}})
    django.setup()
'''


@dataclass(frozen=True)
class Block:
    line: int
    lang: str
    code: str
    skip: str | None

    @property
    def name(self) -> str:
        return f"README.md:{self.line} ({self.lang})"


def blocks(text: str) -> list[Block]:
    """The fenced blocks of ``text`` with their language and skip reason, if any."""
    found: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start, lang = i, match.group(1)
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        code = "\n".join(lines[start + 1:j]) + "\n"
        above = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        marker = MARKER.search(above)
        skip = (marker.group(1) or "marked skip") if marker else None
        for needle, reason in SKIPPED.items():
            if skip is None and needle in code:
                skip = reason
        found.append(Block(start + 1, lang, code, skip))
        i = j + 1
    return found


def runnable(lang: str) -> list[Block]:
    return [b for b in blocks(README.read_text(encoding="utf-8")) if b.lang == lang]


def base_env(tmp: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPERCACHEIO_")}
    env.update({
        "HYPERCACHEIO_SQLITE_PATH": str(tmp / "store"),
        "HYPERCACHEIO_NODE_PORT": str(port),
        "HYPERCACHEIO_API_TOKEN": TOKEN,
        "XDG_CACHE_HOME": str(tmp / "xdg"),  # nothing lands in the real home directory
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
        "COLUMNS": "200",
    })
    return env


@dataclass
class Site:
    tmp: Path
    port: int
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hypercacheio.cli", *args], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """A node on a free port over the temporary store, as the README's blocks expect."""
    tmp = tmp_path_factory.mktemp("readme")
    port = free_port()
    env = base_env(tmp, port)
    started = _cli(env, "node", "start")
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield Site(tmp, port, env)
    finally:
        _cli(env, "node", "stop")


def test_the_readme_has_runnable_blocks() -> None:
    """The extraction itself: a test that finds nothing to run could never fail."""
    found = blocks(README.read_text(encoding="utf-8"))
    assert sum(1 for b in found if b.lang == "python" and not b.skip) >= 3
    assert sum(1 for b in found if b.lang == "bash" and not b.skip) >= 2
    for block in found:
        if block.lang == "bash" and not block.skip:
            assert "sudo " not in block.code, f"{block.name}: sudo in a block that runs"


def test_no_example_writes_under_var_lib_by_default() -> None:
    """A pasted example must not put a cache in a system directory (as root it would)."""
    for block in blocks(README.read_text(encoding="utf-8")):
        if block.lang not in ("python", "bash") or block.skip:
            continue
        for line in block.code.splitlines():
            code = line.split("#", 1)[0]
            assert "/var/lib" not in code, f"{block.name}: {line.strip()}"


@pytest.mark.parametrize("block", runnable("python"), ids=lambda b: b.name)
def test_python_block(block: Block, site: Site, tmp_path: Path) -> None:
    if block.skip:
        pytest.skip(block.skip)
    code = re.sub(r"https?://(?:\d{1,3}\.){3}\d{1,3}:8080", site.url, block.code)
    prelude = PRELUDE + (DJANGO_PRELUDE if "django" in code else "")
    script = tmp_path / "block.py"
    script.write_text(prelude + "\n" + code, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script)], env=site.env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{block.name}:\n{block.code}\n{proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("block", runnable("bash"), ids=lambda b: b.name)
def test_bash_block(block: Block, site: Site, tmp_path: Path) -> None:
    if block.skip:
        pytest.skip(block.skip)
    env = dict(site.env)
    if "node start" in block.code:  # it manages a node of its own
        env.update(base_env(tmp_path, free_port()))
    proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.code], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{block.name}:\n{block.code}\n{proc.stdout}{proc.stderr}"
    if "node start" in block.code:
        pid_file = tmp_path / "store" / "node.pid"
        assert wait_until(lambda: not pid_file.exists(), 10), "the block left a node running"


def test_command_line_block_prints_what_it_says(site: Site, tmp_path: Path) -> None:
    """The comments of the Command line block are the output: ``get doc`` prints JSON."""
    block = next(b for b in runnable("bash") if "hypercacheio get doc" in b.code)
    proc = subprocess.run(["bash", "-e", "-c", block.code], env=site.env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "hello\n" in proc.stdout and '{"a": [1]}\n' in proc.stdout
    assert f"storage: {site.tmp / 'store'}" in proc.stderr


def test_code_map_lists_every_module() -> None:
    """The README's Code map has one row per module of src/hypercacheio, and no stale rows."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Code map", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([\w/]+\.py)` \|", section, flags=re.M)
    listed = set(rows)
    assert sorted(r for r in listed if rows.count(r) > 1) == [], "a module listed twice"
    src = Path(__file__).parents[1] / "src" / "hypercacheio"
    modules = {str(p.relative_to(src)) for p in src.rglob("*.py")
               if "__pycache__" not in p.parts
               and not (p.name == "__init__.py" and not p.read_text().strip())}
    assert sorted(modules - listed) == [], "add a row per new module to README's Code map"
    assert sorted(listed - modules) == [], "README's Code map lists modules that do not exist"
