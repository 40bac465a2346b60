"""HTTP load generator for the OpenAI-compatible server (loopback only)."""
