"""Write the seed's three example checkpoints (and a broken one) into a folder for `make demo`.

Usage: python examples/demo.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples.seed_models import CNN, CNNWithStage, wrapped_example3


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(CNN().state_dict(), out / "example1.pth")
    torch.save(CNNWithStage().state_dict(), out / "example2.pth")
    # Example 3 as the seed saves it: DataParallel around the whole model, so every key gains
    # `module.` and the inner DataParallel adds `stage2.module.`: loading it into the plain
    # model fails with missing and unexpected keys: the broken checkpoint the demo repairs.
    torch.save(wrapped_example3().state_dict(), out / "example3_dataparallel.pth")
    for name in ("example1.pth", "example2.pth", "example3_dataparallel.pth"):
        print(f"wrote {out / name}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-out"))
