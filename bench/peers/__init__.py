"""The Python peers: the counter server as websockets' docs wrote it, then and now."""
