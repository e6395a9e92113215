"""Where bytes come from and go to: atomic outputs and byte-range copies."""
