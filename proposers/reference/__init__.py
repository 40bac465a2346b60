"""msn-serve: proposers/reference."""
