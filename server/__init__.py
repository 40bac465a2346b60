"""msn-serve: server."""
