"""The wire contract of the node API, shared by the server (api.py) and the client (client.py).

A value travels as the raw request or response body; its codec tag travels by name in
``X-Hypercacheio-Type`` (``bytes`` when absent, so ``curl -d`` stores bytes). An ``int`` is
sent as decimal ASCII, a ``str`` as UTF-8, ``bytes`` and ``pickle`` as they are: the node
never unpickles. Everything that is not a value (results, errors, lock owners and fencing
numbers) is JSON.
"""

from __future__ import annotations

from .. import codec
from ..config import API_PATH

PREFIX = API_PATH
TOKEN_HEADER = "X-Hypercacheio-Token"
TYPE_HEADER = "X-Hypercacheio-Type"
TTL_HEADER = "X-Hypercacheio-TTL"
EXPIRES_HEADER = "X-Hypercacheio-Expires-At"
# HYPERCACHEIO_ASYNC=false: how many secondaries acknowledged a write before its answer
REPLICAS_HEADER = "X-Hypercacheio-Replicas"
# On the answer to a write that took a version: that version (the hybrid logical clock,
# decimal) and the id of the node that gave it. A secondary applies the write locally with
# them (read-your-writes; the push of the same record then changes nothing).
VERSION_HEADER = "X-Hypercacheio-Version"
ORIGIN_HEADER = "X-Hypercacheio-Origin"
# Sent by a secondary with a touch: answer the touched value as a GET would (200, or 404 for
# a missing key), so that it can apply the touch as the whole row.
RETURN_HEADER = "X-Hypercacheio-Return"

TYPE_NAMES: dict[int, str] = dict(codec.TAGS)
TYPE_TAGS: dict[str, int] = {name: tag for tag, name in TYPE_NAMES.items()}

CONTENT_TYPES: dict[int, str] = {
    codec.TAG_INT: "text/plain; charset=utf-8",
    codec.TAG_STR: "text/plain; charset=utf-8",
    codec.TAG_BYTES: "application/octet-stream",
    codec.TAG_PICKLE: "application/octet-stream",
}


def payload_to_body(tag: int, payload: codec.Payload) -> bytes:
    """The HTTP body carrying a stored (tag, payload)."""
    if tag == codec.TAG_INT:
        return str(int(payload)).encode("ascii")
    if tag == codec.TAG_STR:
        assert isinstance(payload, str)
        return payload.encode("utf-8")
    assert not isinstance(payload, (int, str))
    return bytes(payload)


def body_to_payload(tag: int, body: bytes) -> codec.Payload:
    """The payload carried by an HTTP body; ValueError says why it does not fit the tag."""
    if tag == codec.TAG_INT:
        text = body.decode("ascii", "replace").strip()
        if not text or not text.lstrip("+-").isdigit() or not text.isascii():
            raise ValueError("an int value must be a decimal integer")
        value = int(text)
        if not codec.INT64_MIN <= value <= codec.INT64_MAX:
            raise ValueError("an int value must fit in 64 bits (send larger ones as pickle)")
        return value
    if tag == codec.TAG_STR:
        return body.decode("utf-8")
    return body


# The batch routes (node/batch.py): msgpack bodies, each value as [type name, payload body].
MSGPACK_TYPE = "application/msgpack"
BATCH_MAX_KEYS = 1000  # keys per batch request; a client splits reads into such slices
