"""Framework integrations: thin translations from a framework's cache contract to Cache.

``hypercacheio.contrib.django`` is the Django cache backend and app; ``hypercacheio.contrib.flask``
is the Flask-Caching backend. Neither holds cache logic: that lives in the engine.
"""

from __future__ import annotations

import hashlib

from ..codec import MAX_KEY_BYTES


def fit_engine_key(key: str) -> str:
    """A key the engine accepts: above 1,024 UTF-8 bytes or holding NUL (which the engine
    keeps for internal names), its head without NUL plus a SHA-256 digest of the whole.

    Frameworks accept longer keys than the engine, and NUL; this maps them one-to-one (in
    practice) onto keys of bounded size without NUL, the same way in every process.
    """
    raw = key.encode("utf-8", "surrogatepass")
    if len(raw) <= MAX_KEY_BYTES and "\0" not in key:
        return key
    return f"{key[:200].replace(chr(0), '')}#sha256:{hashlib.sha256(raw).hexdigest()}"
