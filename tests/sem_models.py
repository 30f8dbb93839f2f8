"""Small models for the floating-point semantics tests (proofs/float_semantics.md)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def cancel_model(big: float = 1024.0) -> nn.Module:
    """x -> x + big -> (.) - big -> logits (0.1 - x, x): exactly f1 - f0 = 2x - 0.1, body Lipschitz 1.
    Executed in a format whose spacing at ``big`` exceeds 2|x|, x + big rounds to big and class 0 wins."""
    up, down, head = nn.Linear(1, 1), nn.Linear(1, 1), nn.Linear(1, 2)
    with torch.no_grad():
        up.weight.fill_(1.0)
        up.bias.fill_(big)
        down.weight.fill_(1.0)
        down.bias.fill_(-big)
        head.weight.copy_(torch.tensor([[-1.0], [1.0]]))
        head.bias.copy_(torch.tensor([0.1, 0.0]))
    return nn.Sequential(nn.Flatten(), up, down, head).eval()


def export(model: nn.Module, path, shape=(1, 1, 1)) -> None:
    torch.onnx.export(model, (torch.zeros(2, *shape),), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, opset_version=17)


def cancel_data(n: int = 4):
    x = np.full((n, 1, 1, 1), 0.3, dtype=np.float32)
    x[1:] = np.linspace(0.25, 0.45, n - 1, dtype=np.float32).reshape(-1, 1, 1, 1)
    return x, np.ones(n, dtype=np.int64)
