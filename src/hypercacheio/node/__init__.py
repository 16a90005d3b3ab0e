"""The node daemon: an HTTP API over the store (api.py), its client (client.py), background
collection (gc.py), the process around them (daemon.py) and the ``node`` commands."""
