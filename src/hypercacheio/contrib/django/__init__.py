"""Django integration: the cache backend and an optional app with management commands.

``CACHES = {"default": {"BACKEND": "hypercacheio.contrib.django.HyperCacheIOCache",
"LOCATION": "/var/lib/myapp/hypercacheio"}}``; add ``"hypercacheio.contrib.django"`` to
``INSTALLED_APPS`` for ``manage.py hypercacheio install|stats|check|node``.
"""

from .backend import HyperCacheIOCache

__all__ = ["HyperCacheIOCache"]
