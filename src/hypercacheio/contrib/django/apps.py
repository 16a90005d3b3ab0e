"""The optional Django app: it only brings the ``hypercacheio`` management command."""

from __future__ import annotations

from django.apps import AppConfig


class HyperCacheIOConfig(AppConfig):
    name = "hypercacheio.contrib.django"
    label = "hypercacheio"
    verbose_name = "hypercacheio"
