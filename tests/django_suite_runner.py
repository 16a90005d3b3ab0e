"""Run Django's own ``BaseCacheTests`` against HyperCacheIOCache; also the settings module.

Started by tests/test_django_suite.py in a separate interpreter that has one Django version
installed (and nothing of pytest): ``python django_suite_runner.py SUITE_PARENT STORE RESULT``.
SUITE_PARENT holds the package ``cache`` (``tests/cache`` of the matching Django sdist),
STORE is the storage directory that all seven aliases share, RESULT receives the counts as
JSON. As a module, it is the ``DJANGO_SETTINGS_MODULE`` of that run.
"""

from __future__ import annotations

import json
import os
import sys

BACKEND = "hypercacheio.contrib.django.HyperCacheIOCache"
STORE = os.environ.get("HYPERCACHEIO_SUITE_STORE", "")

# ---- settings ---------------------------------------------------------------------------

SECRET_KEY = "django-suite-run-only"
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "cache"]
CACHES = {"default": {"BACKEND": BACKEND, "LOCATION": STORE}}
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
MIDDLEWARE: list[str] = []


def run(suite_parent: str, store: str, result_path: str) -> int:
    import unittest

    import django

    sys.path.insert(0, suite_parent)
    django.setup()
    from cache.tests import BaseCacheTests, caches_setting_for_tests  # Django's, downloaded
    from django.test import TestCase, override_settings
    from django.test.runner import DiscoverRunner

    # Every alias (default, prefix, v2, custom_key, custom_key2, cull, zero_cull) on one store.
    @override_settings(CACHES=caches_setting_for_tests(BACKEND=BACKEND, LOCATION=store))
    class HyperCacheIOCacheTests(BaseCacheTests, TestCase):
        pass

    runner = DiscoverRunner(verbosity=2, interactive=False)
    runner.setup_test_environment()
    old_config = runner.setup_databases()
    try:
        suite = unittest.defaultTestLoader.loadTestsFromTestCase(HyperCacheIOCacheTests)
        result = runner.run_suite(suite)
    finally:
        runner.teardown_databases(old_config)
        runner.teardown_test_environment()
    counts = {
        "django": django.get_version(),
        "python": sys.version.split()[0],
        "collected": suite.countTestCases(),
        "run": result.testsRun,
        "failures": [str(test) for test, _ in result.failures],
        "errors": [str(test) for test, _ in result.errors],
        "skipped": [f"{test}: {reason}" for test, reason in result.skipped],
        "expected_failures": len(result.expectedFailures),
        "unexpected_successes": len(result.unexpectedSuccesses),
    }
    with open(result_path, "w", encoding="utf-8") as fh:
        json.dump(counts, fh, indent=2)
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    parent, store_dir, result_file = sys.argv[1:]
    os.environ["HYPERCACHEIO_SUITE_STORE"] = store_dir
    os.environ["DJANGO_SETTINGS_MODULE"] = "django_suite_runner"
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(run(parent, store_dir, result_file))
