"""Templates: a root filesystem recipe plus a start command and a readiness check, built into a snapshot
that new sandboxes are restored from."""
