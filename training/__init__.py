"""msn-serve: training."""
