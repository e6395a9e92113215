"""ckptdoctor: read, explain and repair PyTorch checkpoints without running code from them."""

from __future__ import annotations

__version__ = "0.1.0"
