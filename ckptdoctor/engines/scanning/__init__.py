"""scan: a static walk of every pickle and an independent audit of the archive, never importing anything."""
