"""Views that exercise what worker processes share: counters, add and a lock.

``/hit`` counts with the atomic ``incr``, then runs a read-modify-write of a second counter
inside ``cache.lock``. While inside, it holds a marker made with ``add``: if the marker is
already there, two workers were inside at once, and ``overlaps`` is incremented.
"""

import os

from django.core.cache import cache
from django.http import HttpRequest, JsonResponse


def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"ok": True, "pid": os.getpid()})


def hit(request: HttpRequest) -> JsonResponse:
    cache.add("hits", 0, None)  # create once; Django's incr refuses a missing key
    hits = cache.incr("hits")
    with cache.lock("demo:counter", ttl=60, blocking_timeout=60):
        if not cache.add("demo:inside", os.getpid(), None):
            cache.add("overlaps", 0, None)
            cache.incr("overlaps")
        counter = cache.get("locked_counter", 0)
        cache.set("locked_counter", counter + 1, None)
        cache.delete("demo:inside")
    return JsonResponse({"hits": hits, "pid": os.getpid()})


def totals(request: HttpRequest) -> JsonResponse:
    return JsonResponse({
        "hits": cache.get("hits", 0),
        "locked_counter": cache.get("locked_counter", 0),
        "overlaps": cache.get("overlaps", 0),
    })
