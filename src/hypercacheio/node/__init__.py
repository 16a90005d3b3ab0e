"""The node daemon and its client.

api.py (the HTTP routes), protocol.py (the wire contract both sides share), openapi.py
(the API's document), options.py (the daemon's own settings and its token), gc.py
(background collection), daemon.py (pid file, signals, logging, serving), commands.py
(``hypercacheio node ...``), client.py (RemoteCache) and transport.py (its connections).
"""
