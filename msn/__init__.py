"""msn-serve: msn."""
