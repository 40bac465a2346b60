"""msn-serve: proposers."""
