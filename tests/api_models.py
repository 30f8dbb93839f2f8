"""Small torch models for the library-API tests (trained in about a second)."""

from __future__ import annotations

import functools

import torch

from certlib.data import load


def mlp(hidden: int = 32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, 10))


@functools.lru_cache(maxsize=None)
def trained_mlp(steps: int = 120, seed: int = 0) -> torch.nn.Module:
    d = load("digits", "train")
    x, y = torch.tensor(d.x), torch.tensor(d.y)
    model = mlp(seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


class Sneaky(torch.nn.Module):
    """Exports one function and then computes another (``shift`` set after export)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.shift = 0.0

    def forward(self, x):
        out = self.inner(x)
        if self.shift:
            out = out + self.shift * torch.arange(out.shape[1], dtype=out.dtype)
        return out
