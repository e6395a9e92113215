"""Shared test set-up: the repository root on sys.path so `examples` and `tests` import."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Property tests run derandomized by default so CI is reproducible (a failure is the same
# failure on every machine); HYPOTHESIS_PROFILE=explore searches with fresh random seeds.
import os  # noqa: E402

from hypothesis import settings  # noqa: E402

settings.register_profile("ckptdoctor", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", derandomize=False, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ckptdoctor"))
