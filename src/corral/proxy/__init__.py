"""The sandbox proxy: forwards SDK traffic to a port inside a sandbox."""
