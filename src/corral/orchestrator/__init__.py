"""The node orchestrator: turns runtime sandboxes into ready, initialised E2B sandboxes (pools, envd
hand-over, live metrics). The control plane calls it; it calls the runtime."""
