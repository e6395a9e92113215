"""inspect: the folded key tree and the checkpoint overview."""
