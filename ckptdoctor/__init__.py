"""ckptdoctor: read, explain and repair PyTorch checkpoints without running code from them.

The Python API (``adapt``, ``diagnose``) is imported lazily so ``import ckptdoctor`` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["AdaptError", "__version__", "adapt", "diagnose"]


def __getattr__(name: str) -> Any:
    if name in ("adapt", "diagnose", "AdaptError"):
        from ckptdoctor import api  # noqa: PLC0415 - lazy: keeps CLI start-up fast

        return getattr(api, name)
    raise AttributeError(f"module 'ckptdoctor' has no attribute {name!r}")
