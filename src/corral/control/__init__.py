"""The control plane: E2B-compatible REST API, API keys, sandbox state and lifecycle timers."""
