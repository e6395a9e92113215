"""The three example models of the seed write-up (shared/seed/state-dict-naming.zh.txt).

1. ``CNN``: layers as named attributes → ``conv1.weight`` ...
2. ``CNNWithStage``: the same modules also put in an ``nn.Sequential`` → ``stage1.0.weight`` appears
   beside ``conv1.weight`` (the two keys share one tensor).
3. ``CNNWithWrappedStage``: a Sequential wrapped in ``DataParallel`` inside the model → ``stage2.module.0``;
   the demo wraps the whole model in ``DataParallel`` too, so every key starts with ``module.``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn
from torch.nn import DataParallel


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, kernel_size=3, stride=1, padding=1)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 24, kernel_size=3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(24)
        self.fc1 = nn.Linear(24 * 5 * 5, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):  # type: ignore[no-untyped-def]
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = x.view(-1, 24 * 5 * 5)
        return self.fc2(F.relu(self.fc1(x)))


class CNNWithStage(CNN):
    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.conv1 = nn.Conv2d(3, 12, kernel_size=3, stride=1, padding=1)
        self.bn1 = nn.BatchNorm2d(12)
        self.s1 = [self.conv1, self.bn1]  # a plain list: not registered, as the seed points out
        self.stage1 = nn.Sequential(*self.s1)
        self.conv2 = nn.Conv2d(12, 24, kernel_size=3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(24)
        self.fc1 = nn.Linear(24 * 5 * 5, 128)
        self.fc2 = nn.Linear(128, 10)


class CNNWithWrappedStage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        conv1 = nn.Conv2d(3, 12, kernel_size=3, stride=1, padding=1)
        bn1 = nn.BatchNorm2d(12)
        self.stage1 = nn.Sequential(conv1, bn1)
        self.stage2 = DataParallel(self.stage1)
        self.conv2 = nn.Conv2d(12, 24, kernel_size=3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(24)
        self.fc1 = nn.Linear(24 * 5 * 5, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):  # type: ignore[no-untyped-def]
        x = self.stage2(x)
        x = F.relu(self.bn2(self.conv2(x)))
        x = x.view(-1, 24 * 5 * 5)
        return self.fc2(F.relu(self.fc1(x)))


def wrapped_example3() -> nn.Module:
    """Example 3 exactly as the seed runs it: the whole model wrapped in DataParallel."""
    return DataParallel(CNNWithWrappedStage())
