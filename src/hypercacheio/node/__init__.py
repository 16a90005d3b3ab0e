"""The node daemon and its client.

The HTTP API: state.py (what handlers share), guard.py (auth, limits, the JSON errors),
routing.py (the route table, the app), handlers.py (single-key routes), batch.py (many-key
routes), connections.py (connection cap and timeouts). protocol.py (the wire contract both
sides share), openapi.py (the API's document), options.py (the daemon's own settings), gc.py
(background upkeep), daemon.py (signals, logging, serving), supervise.py (the pid file,
start, stop, status; ``hypercacheio node ...`` in ``cli/node.py`` prints what it returns),
client.py (RemoteCache) and transport.py (its connections). The token: ``hypercacheio.auth``.
"""
