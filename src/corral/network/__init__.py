"""Host networking for sandboxes: one network namespace per sandbox and one nftables table per instance."""
