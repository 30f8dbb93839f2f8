"""Fixtures of the example suite: a small PyTorch model trained on the digits
(8x8 images, 10 classes) for a few seconds, and the digits test split."""

import pytest
import torch

import certlib
from certlib.data import load


def train_digits_model(steps: int = 300, seed: int = 0) -> torch.nn.Module:
    d = load("digits", "train")
    x, y = torch.tensor(d.x), torch.tensor(d.y)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def digits_model():
    """The trained torch module, imported once (export + checks) for every test."""
    module = train_digits_model()
    return module, certlib.load_model(module, (1, 8, 8))


@pytest.fixture(scope="session")
def digits_test():
    return load("digits", "test")
