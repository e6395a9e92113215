"""Classes a Lightning-style checkpoint keeps in its hyper-parameters (test_allow_global).

Importing this module writes the file named by ``CKPTDOCTOR_SENTINEL`` (when set): a test
that reads a checkpoint naming ``allow_sentinel.Mode`` proves nothing imported it.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path

_marker = os.environ.get("CKPTDOCTOR_SENTINEL")
if _marker:
    Path(_marker).write_text("imported\n")


class Mode(enum.Enum):
    A = "a"
    B = "b"
