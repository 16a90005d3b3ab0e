"""PrimaryClient: the client a secondary's ``Cache`` writes through (replication/forward.py).

Each write answers, besides its result, the version the primary stamped it with
(``Written``: the X-Hypercacheio-Version, -Origin and -Expires headers), so that the
secondary can apply the same row here at once (read-your-writes). Keys are given checked,
values encoded, ttls as seconds (None: never; > 0).
"""

from __future__ import annotations

from typing import NamedTuple

from .. import codec
from ..errors import NodeUnavailable
from . import protocol as p
from .client import TYPE_KEY, RemoteCache, _quote_key
from .transport import Response

VERSION_KEY = p.VERSION_HEADER.lower()
ORIGIN_KEY = p.ORIGIN_HEADER.lower()
EXPIRES_KEY = p.EXPIRES_HEADER.lower()


class Written(NamedTuple):
    """What a node said about a write it committed: its version and the node that gave it
    (``version`` 0: the write took none, it changed nothing), and the expiry it stored.
    A secondary applies the write locally with them (``hypercacheio.replication.forward``).
    """

    version: int
    origin: str
    expire_at: float | None


class PrimaryClient(RemoteCache):
    """A ``RemoteCache`` on the primary whose writes also answer their version."""

    def _written(self, resp: Response) -> Written:
        headers = resp.headers
        try:
            version = int(headers.get(VERSION_KEY) or 0)
            expires = headers.get(EXPIRES_KEY)
            expire_at = None if expires is None else float(expires)
        except ValueError as exc:
            raise NodeUnavailable(f"node at {self._where()} sent an unreadable version or "
                                  f"expiry header: {exc}") from exc
        return Written(version, headers.get(ORIGIN_KEY, ""), expire_at)

    def _value_headers(self, tag: int, seconds: float | None) -> dict[str, str]:
        headers = dict(self._headers)
        headers[p.TYPE_HEADER] = p.TYPE_NAMES[tag]
        if seconds is not None:
            headers[p.TTL_HEADER] = repr(float(seconds))
        return headers

    def set_written(self, key: str, tag: int, payload: codec.Payload,
                     seconds: float | None) -> Written:
        headers = self._value_headers(tag, seconds)
        return self._written(self._request("POST", "/cache/" + _quote_key(key),
                                           body=p.payload_to_body(tag, payload),
                                           headers=headers))

    def add_written(self, key: str, tag: int, payload: codec.Payload,
                     seconds: float | None) -> tuple[bool, Written]:
        headers = self._value_headers(tag, seconds)
        resp = self._request("POST", "/add/" + _quote_key(key),
                             body=p.payload_to_body(tag, payload), headers=headers,
                             idempotent=False)
        return bool(self._json(resp).get("added")), self._written(resp)

    def set_many_written(self, rows: list[tuple[str, int, codec.Payload]],
                          seconds: float | None) -> Written:
        items = [[key, p.TYPE_NAMES[tag], p.payload_to_body(tag, payload)]
                 for key, tag, payload in rows]
        body, headers = self._pack({"items": items, "ttl": seconds})
        return self._written(self._request("POST", "/many/set", body, headers))

    def delete_written(self, key: str) -> tuple[bool, Written]:
        resp = self._request("DELETE", "/cache/" + _quote_key(key))
        return bool(self._json(resp).get("deleted")), self._written(resp)

    def delete_many_written(self, keys: list[str]) -> tuple[int, Written]:
        body, headers = self._pack({"keys": keys})
        resp = self._request("POST", "/many/delete", body, headers)
        return int(self._json(resp).get("deleted", 0)), self._written(resp)

    def _row_written(self, resp: Response, what: str
                     ) -> tuple[tuple[int, codec.Payload] | None, Written]:
        """The (tag, payload) a write answered with (None on 404) and the write's version."""
        if resp.status == 404:
            return None, self._written(resp)
        tag = p.TYPE_TAGS.get(resp.headers.get(TYPE_KEY, "bytes"), codec.TAG_BYTES)
        try:
            payload = p.body_to_payload(tag, resp.body)
        except ValueError as exc:
            raise NodeUnavailable(f"node at {self._where()} sent an unreadable value for "
                                  f"{what}: {exc}") from exc
        return (tag, payload), self._written(resp)

    def pull_written(self, key: str) -> tuple[tuple[int, codec.Payload] | None, Written]:
        """The pulled (tag, payload) (None if missing) and the version of the delete."""
        resp = self._request("POST", "/pull/" + _quote_key(key), idempotent=False)
        return self._row_written(resp, "POST /pull")

    def incr_written(self, key: str, delta: int, seconds_if_new: float | None,
                      create: bool = True) -> tuple[int, Written]:
        """The counter's new value; KeyError when missing and not ``create``."""
        fields = {"delta": str(delta)}
        if seconds_if_new is not None:
            fields["ttl"] = repr(float(seconds_if_new))
        if not create:
            fields["create"] = "false"
        resp = self._request("POST", "/incr/" + _quote_key(key), fields=fields,
                             idempotent=False)
        if resp.status == 404:
            raise KeyError(key)
        return int(self._json(resp)["value"]), self._written(resp)

    def touch_written(self, key: str, seconds: float | None
                       ) -> tuple[tuple[int, codec.Payload] | None, Written]:
        """The touched row's (tag, payload) (None if the key was missing), for a ttl > 0
        or None."""
        headers = dict(self._headers)
        headers[p.RETURN_HEADER] = "row"
        if seconds is not None:
            headers[p.TTL_HEADER] = repr(float(seconds))
        resp = self._request("POST", "/touch/" + _quote_key(key), headers=headers,
                             idempotent=False)
        return self._row_written(resp, "POST /touch")

    def clear_written(self) -> tuple[int, Written]:
        resp = self._request("DELETE", "/cache")
        return int(self._json(resp).get("cleared", 0)), self._written(resp)


__all__ = ["PrimaryClient", "Written"]
