"""Model callables for `make bench`: big models that must cost no weight memory (meta device)."""

from __future__ import annotations

from torch import nn


class _Block(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)


def llama_7b_like() -> nn.Module:
    """34 blocks of Linear layers with LLaMA-7B's widths: 7.1 billion parameters."""
    model = nn.Module()
    model.embed = nn.Embedding(32000, 4096)
    model.layers = nn.ModuleList(_Block(4096, 11008) for _ in range(34))
    model.lm_head = nn.Linear(4096, 32000, bias=False)
    return model
