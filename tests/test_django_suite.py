"""Django's own cache tests (``BaseCacheTests``) against HyperCacheIOCache, per Django series.

For each series a virtualenv with that Django (and nothing of ours: the runner puts ``src``
on PYTHONPATH, so the code under test is always the working tree) is made under
``.cache-django/``, the matching Django sdist is fetched from PyPI and only its
``tests/cache`` is unpacked, as the package ``cache``. No Django code is committed.
Everything is kept in ``.cache-django/`` (git-ignored), so reruns need no network.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CACHE_ROOT = Path(os.environ.get("HYPERCACHEIO_DJANGO_CACHE", REPO / ".cache-django"))
RUNNER = Path(__file__).resolve().parent / "django_suite_runner.py"
PYPI_JSON = "https://pypi.org/pypi/Django/{version}/json"

# Tests in BaseCacheTests per Django feature release, as counted in each release's suite:
# all must run, none may be skipped. A release not listed must run all that it collects.
EXPECTED_TESTS = {"4.2": 54, "5.2": 54, "6.1": 62}


def python_312() -> str | None:
    """An interpreter new enough for Django 6 (>= 3.12), or None."""
    candidates = [os.environ.get("HYPERCACHEIO_PYTHON312", ""),
                  "/root/.pyenv/versions/3.12.1/bin/python"]
    candidates += [shutil.which(f"python3.{minor}") or "" for minor in (12, 13, 14)]
    if sys.version_info >= (3, 12):
        candidates.insert(0, sys.executable)
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    return None


SERIES = [
    pytest.param("4.2", "Django>=4.2,<4.3", sys.executable, id="django-4.2"),
    pytest.param("5.2", "Django>=5.2,<5.3", sys.executable, id="django-5.2"),
    pytest.param("6", "Django>=6.0,<7", python_312(), id="django-6.x"),
]


@contextmanager
def cache_lock() -> Iterator[None]:
    """One preparer at a time (parallel test runs share .cache-django)."""
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(CACHE_ROOT / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return str(proc.stdout)


def django_venv(series: str, requirement: str, python: str) -> Path:
    """The interpreter of .cache-django/venv-SERIES, made once with ``requirement``."""
    venv = CACHE_ROOT / f"venv-{series}"
    ready = venv / ".ready"
    if not ready.exists():
        shutil.rmtree(venv, ignore_errors=True)
        run([python, "-m", "venv", str(venv)])
        run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", requirement])
        ready.write_text(requirement + "\n")
    return venv / "bin" / "python"


def download_sdist(version: str, python: Path) -> Path:
    """Django's sdist of exactly ``version`` (PyPI's JSON API, else ``pip download``)."""
    target = CACHE_ROOT / "sdists"
    target.mkdir(exist_ok=True)
    for existing in target.glob(f"[dD]jango-{version}.tar.gz"):
        return existing
    try:
        with urllib.request.urlopen(PYPI_JSON.format(version=version), timeout=60) as resp:
            info = json.load(resp)
        sdist = next(u for u in info["urls"] if u["packagetype"] == "sdist")
        partial = target / (sdist["filename"] + ".part")
        with urllib.request.urlopen(sdist["url"], timeout=300) as resp, \
                open(partial, "wb") as out:
            shutil.copyfileobj(resp, out)
        digest = hashlib.sha256(partial.read_bytes()).hexdigest()
        if digest != sdist["digests"]["sha256"]:
            partial.unlink()
            raise RuntimeError(f"{sdist['filename']}: sha256 mismatch")
        final = target / sdist["filename"]
        partial.rename(final)
        return final
    except (OSError, StopIteration, KeyError, ValueError):
        run([str(python), "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
             f"Django=={version}", "-d", str(target)])
    return next(target.glob(f"[dD]jango-{version}.tar.gz"))


def django_test_package(version: str, python: Path) -> Path:
    """A directory holding the package ``cache``: tests/cache of Django ``version``."""
    parent = CACHE_ROOT / f"suite-{version}"
    if (parent / "cache" / "tests.py").exists():
        return parent
    sdist = download_sdist(version, python)
    staging = Path(tempfile.mkdtemp(dir=CACHE_ROOT))
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers()
                   if m.isfile() and m.name.split("/")[1:3] == ["tests", "cache"]]
        for member in members:
            member.name = "cache/" + "/".join(member.name.split("/")[3:])
            tar.extract(member, staging)
    if not (staging / "cache" / "tests.py").exists():
        raise RuntimeError(f"{sdist.name} has no tests/cache/tests.py")
    shutil.rmtree(parent, ignore_errors=True)
    staging.rename(parent)
    return parent


@pytest.mark.timeout(1800)
@pytest.mark.parametrize(("series", "requirement", "python"), SERIES)
def test_django_base_cache_tests(series: str, requirement: str, python: str | None,
                                 tmp_path: Path) -> None:
    if python is None:
        pytest.skip("Django 6 needs Python >= 3.12 and none was found "
                    "(set HYPERCACHEIO_PYTHON312)")
    with cache_lock():
        venv_python = django_venv(series, requirement, python)
        version = run([str(venv_python), "-c",
                       "import django; print(django.get_version())"]).strip()
        suite_parent = django_test_package(version, venv_python)

    store = tmp_path / "store"
    result_file = tmp_path / "result.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    env = {k: v for k, v in env.items() if not k.startswith("HYPERCACHEIO_")}
    proc = subprocess.run(
        [str(venv_python), str(RUNNER), str(suite_parent), str(store), str(result_file)],
        capture_output=True, text=True, timeout=1200, env=env, cwd=tmp_path)
    assert result_file.exists(), f"runner crashed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    result = json.loads(result_file.read_text())
    report = (f"Django {result['django']} on Python {result['python']}: "
              f"{result['run']} run, {len(result['failures'])} failed, "
              f"{len(result['errors'])} errors, {len(result['skipped'])} skipped")
    print(report)
    detail = f"{report}\n{proc.stderr[-8000:]}"

    feature = ".".join(version.split(".")[:2])
    expected = EXPECTED_TESTS.get(feature, result["collected"])
    assert result["collected"] == expected, detail
    assert result["run"] == expected, detail
    assert result["failures"] == [], detail
    assert result["errors"] == [], detail
    assert result["skipped"] == [], detail
    assert result["expected_failures"] == 0 and result["unexpected_successes"] == 0, detail
    assert proc.returncode == 0, detail
