"""Settings of the example project: one hypercacheio store shared by every gunicorn worker."""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DEMO_SECRET_KEY", "example-only-not-secret")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "demo.urls"
WSGI_APPLICATION = "demo.wsgi.application"
INSTALLED_APPS = ["hypercacheio.contrib.django"]  # for `manage.py hypercacheio ...`
MIDDLEWARE: list[str] = []
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True

CACHES = {
    "default": {
        "BACKEND": "hypercacheio.contrib.django.HyperCacheIOCache",
        "LOCATION": os.environ.get("DEMO_CACHE_DIR", str(BASE_DIR / "hypercacheio-data")),
        "TIMEOUT": 300,
    }
}
