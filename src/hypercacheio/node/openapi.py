"""The OpenAPI 3.1 document of the node API, built as data (served at ``/openapi.json``).

tests/test_node_schemathesis.py checks the running node against it, so it stays true.
"""

from __future__ import annotations

import json
from typing import Any

from . import protocol as p

TTL_NOTE = ("Seconds to keep the value, from `?ttl=` or the `X-Hypercacheio-TTL` header "
            "(the query wins). Absent or empty: never expires. <= 0: removes the key.")


def _error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _json(description: str, schema: str, headers: dict[str, Any] | None = None
          ) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }
    if headers:
        out["headers"] = headers
    return out


EXPIRES = {p.EXPIRES_HEADER: {
    "description": "Absolute expiry, seconds since the Unix epoch (absent: never expires).",
    "schema": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(e[+-]?[0-9]+)?$"}}}

VERSIONED = {
    p.VERSION_HEADER: {"description": "The version the write took (hybrid logical clock, "
                       "decimal); absent when it changed nothing. A secondary applies the "
                       "write locally at this version.", "schema": {"type": "string"}},
    p.ORIGIN_HEADER: {"description": "The id of the node that gave the version.",
                      "schema": {"type": "string"}}}
WRITTEN = {**EXPIRES, **VERSIONED}

KEY = {"name": "key", "in": "path", "required": True,
       "description": "The key (percent-encoded; non-empty, at most 1024 UTF-8 bytes).",
       "schema": {"type": "string", "minLength": 1}}
TTL_QUERY = {"name": "ttl", "in": "query", "required": False, "description": TTL_NOTE,
             "schema": {"type": "number"}}
TTL_HEAD = {"name": p.TTL_HEADER, "in": "header", "required": False,
            "description": "The TTL in seconds, as `?ttl=`.", "schema": {"type": "number"}}
TYPE_HEAD = {"name": p.TYPE_HEADER, "in": "header", "required": False,
             "description": "How the body is to be read: `bytes` (default), `str` (UTF-8), "
                            "`int` (decimal, 64-bit) or `pickle` (opaque to the node).",
             "schema": {"type": "string", "enum": list(p.TYPE_TAGS)}}
OWNER = {"name": "owner", "in": "query", "required": False,
         "description": "The lock owner token (at most 256 UTF-8 bytes). Acquire without one "
                        "and the node makes one; keep it to release.",
         "schema": {"type": "string", "maxLength": 64}}
POSITIVE_TTL_HEAD = {**TTL_HEAD, "schema": {"type": "number", "exclusiveMinimum": 0}}
VALUE_BODY = {"required": False, "description": "The value, raw.",
              "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                  "format": "binary"}},
                          "text/plain": {"schema": {"type": "string"}}}}

BINARY = {"schema": {"type": "string", "format": "binary"}}
MSGPACK_BODY = {"required": True,
                "description": "A msgpack map (see the description), whatever the Content-Type.",
                "content": {p.MSGPACK_TYPE: BINARY, "application/octet-stream": BINARY}}

COMMON = {"401": _error("Missing or wrong token; nothing changed."),
          "429": _error("Rate limit reached for this client address."),
          "503": _error("The node's storage failed.")}
WITH_KEY = {"400": _error("Invalid key or parameter; nothing changed."), **COMMON}
BATCH = {"400": _error("Not msgpack, an invalid key, type or payload, or more keys than "
                       "the limit; nothing changed."),
         "413": _error("Body larger than the node's value limit plus 64 KiB."), **COMMON}


def _nullable(kind: str) -> dict[str, Any]:
    return {"type": [kind, "null"]}


SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error", "code"],
              "properties": {"error": {"type": "string"}, "code": {"type": "string"}}},
    "Stored": {"type": "object", "required": ["stored", "expires_at"],
               "properties": {"stored": {"type": "boolean"},
                              "expires_at": _nullable("number")}},
    "Added": {"type": "object", "required": ["added", "expires_at"],
              "properties": {"added": {"type": "boolean"}, "expires_at": _nullable("number")}},
    "Deleted": {"type": "object", "required": ["deleted"],
                "properties": {"deleted": {"type": "boolean"}}},
    "Cleared": {"type": "object", "required": ["cleared"],
                "properties": {"cleared": {"type": "integer"}}},
    "Touched": {"type": "object", "required": ["touched", "expires_at"],
                "properties": {"touched": {"type": "boolean"},
                               "expires_at": _nullable("number")}},
    "Counter": {"type": "object", "required": ["value"],
                "properties": {"value": {"type": "integer"}}},
    "LockGrant": {"type": "object", "required": ["acquired", "owner", "fence", "expires_at"],
                  "properties": {"acquired": {"type": "boolean"}, "owner": {"type": "string"},
                                 "fence": _nullable("integer"),
                                 "expires_at": _nullable("number")}},
    "LockRelease": {"type": "object", "required": ["released"],
                    "properties": {"released": {"type": "boolean"},
                                   "reason": {"type": "string"}}},
    "LockStatus": {"type": "object", "required": ["locked", "owned", "fence", "expires_at"],
                   "properties": {"locked": {"type": "boolean"}, "owned": {"type": "boolean"},
                                  "fence": _nullable("integer"),
                                  "expires_at": _nullable("number")}},
    "StoredMany": {"type": "object", "required": ["stored", "expires_at"],
                   "properties": {"stored": {"type": "integer"},
                                  "expires_at": _nullable("number")}},
    "Replicated": {"type": "object", "required": ["acked", "applied", "skipped"],
                   "properties": {"acked": _nullable("integer"), "applied": {"type": "integer"},
                                  "skipped": {"type": "integer"}}},
    "DeletedMany": {"type": "object", "required": ["deleted"],
                    "properties": {"deleted": {"type": "integer"}}},
    "TTL": {"type": "object", "required": ["ttl", "expires_at"],
            "properties": {"ttl": _nullable("number"), "expires_at": _nullable("number")}},
    "Ping": {"type": "object", "required": ["ok"], "properties": {
        "ok": {"type": "boolean"}, "role": {"type": "string"}, "node_id": {"type": "string"},
        "version": {"type": "string"}, "pid": {"type": "integer"},
        "uptime": {"type": "number"}, "started_at": {"type": "number"},
        "listen": {"type": "array", "items": {"type": "string"}},
        "directory": {"type": "string"},
        "entries": {"type": "integer"}, "locks": {"type": "integer"},
        "db_bytes": {"type": "integer"}, "wal_bytes": {"type": "integer"},
        "peers": {"type": "array", "items": {"type": "string"}},
        "secondaries": {"type": "array", "items": {"type": "string"}}}},
}

PATHS: dict[str, Any] = {
    "/cache/{key}": {
        "parameters": [KEY],
        "get": {"operationId": "get", "summary": "Read a value.", "responses": {
            "200": {"description": "The value as the raw body.", "headers": {
                p.TYPE_HEADER: {"description": "The value's type.", "required": True,
                                "schema": {"type": "string", "enum": list(p.TYPE_TAGS)}},
                **EXPIRES},
                    "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                         "format": "binary"}},
                                "text/plain": {"schema": {"type": "string"}}}},
            "404": _error("No live value under this key."), **WITH_KEY}},
        "post": {"operationId": "set", "summary": "Store a value (replaces any).",
                 "parameters": [TTL_QUERY, TTL_HEAD, TYPE_HEAD], "requestBody": VALUE_BODY,
                 "responses": {"200": _json("Stored.", "Stored", WRITTEN),
                               "413": _error("Value larger than the node's limit."),
                               **WITH_KEY}},
        "delete": {"operationId": "delete", "summary": "Remove a key.",
                   "responses": {"200": _json("Whether a live value was removed.", "Deleted",
                                              VERSIONED),
                                 **WITH_KEY}},
    },
    "/cache": {
        "delete": {"operationId": "clear", "summary": "Remove every entry (locks stay).",
                   "responses": {"200": _json("How many rows went.", "Cleared"), **COMMON}},
    },
    "/add/{key}": {
        "parameters": [KEY],
        "post": {"operationId": "add", "summary": "Store only if the key is missing or expired.",
                 "parameters": [TTL_QUERY, TTL_HEAD, TYPE_HEAD], "requestBody": VALUE_BODY,
                 "responses": {"200": _json("Whether it was stored.", "Added", WRITTEN),
                               "413": _error("Value larger than the node's limit."),
                               **WITH_KEY}},
    },
    "/touch/{key}": {
        "parameters": [KEY],
        "post": {"operationId": "touch", "summary": "Give a live key a new TTL from now.",
                 "parameters": [TTL_QUERY, TTL_HEAD],
                 "responses": {"200": _json("Whether the key was there.", "Touched", WRITTEN),
                               **WITH_KEY}},
    },
    "/incr/{key}": {
        "parameters": [KEY],
        "post": {"operationId": "incr",
                 "summary": "Add delta (may be negative) atomically; a missing key starts at 0.",
                 "parameters": [
                     {"name": "delta", "in": "query", "required": False,
                      "schema": {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1,
                                 "default": 1}},
                     {**TTL_QUERY, "description": "TTL of a counter created by this call.",
                      "schema": {"type": "number", "exclusiveMinimum": 0}},
                     POSITIVE_TTL_HEAD,
                     {"name": "create", "in": "query", "required": False,
                      "description": "false: a missing key is not created (404).",
                      "schema": {"type": "boolean", "default": True}}],
                 "responses": {"200": _json("The new value.", "Counter", WRITTEN),
                               "404": _error("No live counter and create=false; nothing "
                                             "changed."),
                               "409": _error("The value is not an integer (code not_integer) "
                                             "or would leave 64 bits (code overflow)."),
                               **WITH_KEY}},
    },
    "/lock/{key}": {
        "parameters": [KEY],
        "get": {"operationId": "lock_status", "summary": "Whether the lock is held.",
                "parameters": [OWNER],
                "responses": {"200": _json("The lock's state.", "LockStatus"), **WITH_KEY}},
        "post": {"operationId": "lock",
                 "summary": "Try once to acquire (or, with extend=true, extend) the lock.",
                 "description": "A grant returns the owner token and a fencing number that "
                                "grows with every grant. Waiting is the client's loop.",
                 "parameters": [OWNER, {**TTL_QUERY, "description":
                                        "Seconds the lock is held at most (> 0); absent: "
                                        "until released.",
                                        "schema": {"type": "number", "exclusiveMinimum": 0}},
                                POSITIVE_TTL_HEAD,
                                {"name": "extend", "in": "query", "required": False,
                                 "schema": {"type": "boolean"}}],
                 "responses": {"200": _json("Whether it was granted.", "LockGrant"),
                               **WITH_KEY}},
        "delete": {"operationId": "unlock", "summary": "Release the lock.",
                   "parameters": [OWNER, {"name": "force", "in": "query", "required": False,
                                          "description": "Release whoever holds it.",
                                          "schema": {"type": "boolean"}}],
                   "responses": {"200": _json("Whether it was released.", "LockRelease"),
                                 **WITH_KEY}},
    },
    "/many/get": {
        "post": {"operationId": "get_many", "summary": "Read many keys at once.",
                 "description": "Body: a msgpack map `{\"keys\": [key, ...]}` (at most "
                                f"{p.BATCH_MAX_KEYS} keys). Answer: a msgpack map "
                                "`{\"values\": {key: [type, payload]}}` of the live keys; "
                                "payload is the body a GET of that key answers with.",
                 "requestBody": MSGPACK_BODY,
                 "responses": {"200": {"description": "The live values.",
                                       "content": {p.MSGPACK_TYPE: BINARY}}, **BATCH}},
    },
    "/many/set": {
        "post": {"operationId": "set_many",
                 "summary": "Store many values in one transaction (all or nothing).",
                 "description": "Body: a msgpack map `{\"items\": [[key, type, payload], "
                                "...], \"ttl\": seconds or nil}`; type as in "
                                f"`{p.TYPE_HEADER}`, payload (msgpack bin) as the body of a "
                                "single set. Every item is checked before anything is "
                                "written. A ttl <= 0 removes the keys.",
                 "requestBody": MSGPACK_BODY,
                 "responses": {"200": _json("How many were stored.", "StoredMany"), **BATCH}},
    },
    "/many/delete": {
        "post": {"operationId": "delete_many", "summary": "Remove many keys in one transaction.",
                 "description": "Body: a msgpack map `{\"keys\": [key, ...]}`.",
                 "requestBody": MSGPACK_BODY,
                 "responses": {"200": _json("How many held live values.", "DeletedMany"),
                               **BATCH}},
    },
    "/replication/batch": {
        "post": {"operationId": "replication_batch",
                 "summary": "Apply a primary's oplog batch (what a primary pushes).",
                 "description": "Body: a msgpack batch frame (hypercacheio.replication.frames)"
                                ", validated whole before anything is applied. `acked`: the "
                                "position this node now holds in the source's oplog.",
                 "requestBody": MSGPACK_BODY,
                 "responses": {"200": _json("Applied (records not newer were skipped).",
                                            "Replicated"),
                               "400": _error("Malformed frame; nothing applied."),
                               "409": _error("need_snapshot: the batch does not follow this "
                                             "node's position (send a snapshot); same_store."),
                               "413": _error("Frame over the node's limit."), **COMMON}},
    },
    "/replication/snapshot": {
        "post": {"operationId": "replication_snapshot",
                 "summary": "Apply a chunk of a primary's snapshot.",
                 "description": "Body: a msgpack snapshot chunk; the last one (`done`) records "
                                "the snapshot's start position, returned as `acked`.",
                 "requestBody": MSGPACK_BODY,
                 "responses": {"200": _json("Applied.", "Replicated"),
                               "400": _error("Malformed frame; nothing applied."),
                               "409": _error("same_store: the frame comes from this node's "
                                             "own database."),
                               "413": _error("Frame over the node's limit."), **COMMON}},
    },
    "/pull/{key}": {
        "parameters": [KEY],
        "post": {"operationId": "pull", "summary": "Read and remove a value in one transaction.",
                 "responses": {"200": {"description": "The value as the raw body (as GET).",
                                       "headers": {p.TYPE_HEADER: {
                                           "description": "The value's type.", "required": True,
                                           "schema": {"type": "string",
                                                      "enum": list(p.TYPE_TAGS)}}, **EXPIRES},
                                       "content": {"application/octet-stream": BINARY,
                                                   "text/plain": {"schema": {
                                                       "type": "string"}}}},
                               "404": _error("No live value under this key."), **WITH_KEY}},
    },
    "/ttl/{key}": {
        "parameters": [KEY],
        "get": {"operationId": "ttl", "summary": "Seconds left before a key expires.",
                "responses": {"200": _json("Seconds left (null: never expires).", "TTL"),
                              "404": _error("No live value under this key."), **WITH_KEY}},
    },
    "/ping": {
        "get": {"operationId": "ping",
                "summary": "Liveness without a token; the node's figures with one.",
                "security": [{}, {"token": []}, {"bearer": []}],
                "responses": {"200": _json("Alive.", "Ping"),
                              "401": _error("A token was sent and it is wrong."),
                              "429": _error("Rate limit reached.")}},
    },
    "/metrics": {
        "get": {"operationId": "metrics", "summary": "Prometheus text format.",
                "responses": {"200": {"description": "Metrics.", "content": {
                    "text/plain": {"schema": {"type": "string"}}}}, **COMMON}},
    },
    "/openapi.json": {
        "get": {"operationId": "openapi", "summary": "This document.", "security": [{}],
                "responses": {"200": {"description": "OpenAPI 3.1.", "content": {
                    "application/json": {"schema": {"type": "object"}}}},
                    "429": _error("Rate limit reached.")}},
    },
}


def document(version: str, servers: list[str] | None = None) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "hypercacheio node API", "version": version,
                 "description": "Values travel as raw bodies with their type in "
                                f"`{p.TYPE_HEADER}`; everything else is JSON. Send the "
                                f"token in `{p.TOKEN_HEADER}` (or `Authorization: Bearer`)."},
        "servers": [{"url": url} for url in (servers or [p.PREFIX])],
        "security": [{"token": []}, {"bearer": []}],
        "components": {
            "securitySchemes": {
                "token": {"type": "apiKey", "in": "header", "name": p.TOKEN_HEADER},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
            "schemas": SCHEMAS,
        },
        "paths": PATHS,
    }


def document_bytes(version: str) -> bytes:
    return json.dumps(document(version), indent=1).encode("utf-8")
