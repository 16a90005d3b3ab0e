"""Operating a host: the node's service files (systemd, launchd), the connectivity check and
the firewall advice it gives. Nothing here prints; ``cli/`` does."""
