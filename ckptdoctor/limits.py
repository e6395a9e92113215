"""Safety limits shared by the readers and ``scan``: one value each, and why.

The readers (``formats``) and the scanner (``engines.scan_*``) parse the same hostile bytes; if
their bounds differ, a file can be "safe" to one and refused by the other for no reason a user
could understand. Each limit is far above what real checkpoints need and low enough that a
crafted file cannot exhaust memory or time.
"""

from __future__ import annotations

#: Members of one zip archive. torch.save writes one member per storage plus about six; the
#: largest real files (training state of models with ~100k parameter tensors, each with two
#: Adam moments) have a few hundred thousand. The central directory is also capped by size
#: (256 MiB in scan), which bounds the memory the member records take.
MAX_MEMBERS = 5_000_000

#: Bytes of one pickle held in memory (a data.pkl read by the reader, a deflated pickle
#: inflated by scan; scan streams stored pickles instead). A pickle costs ~150 bytes per tensor,
#: so even a million-tensor state dict is ~150 MB; 1 GiB of metadata is not a checkpoint.
MAX_PICKLE_BYTES = 1 << 30

#: Nested MARKs in one pickle. Python's pickler recurses once per nested container and stops at
#: the interpreter's recursion limit (1000 by default), and torch.save output nests a few dozen
#: levels; deeper nesting is a bomb. The reader refuses it, scan reports it.
MAX_MARK_DEPTH = 1_000

#: Bytes of one config or tokenizer file that `convert --to hf` copies along. The largest real
#: tokenizer.json files (multilingual vocabularies) are ~35 MB; a "config" of gigabytes is not one.
MAX_COMPANION_BYTES = 256 << 20
