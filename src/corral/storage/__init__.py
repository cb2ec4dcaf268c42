"""Sandbox filesystems on the host: per-sandbox disks and the overlay root filesystems built on them."""
