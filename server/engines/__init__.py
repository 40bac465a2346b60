"""Engine adapters behind `server.engines.base.Engine`."""
