"""envd: the daemon inside every sandbox that speaks E2B's process and filesystem protocol.

Runs inside the sandbox with its own private dependencies; imports nothing from the host side.
"""

# The highest E2B envd version whose features this daemon implements (see docs/envd.md).
ENVD_VERSION = "0.6.4"
DEFAULT_PORT = 49983
