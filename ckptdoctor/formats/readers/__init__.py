"""One reader per on-disk format, each returning a Checkpoint; picked by content in formats/__init__.py."""
