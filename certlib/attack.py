"""PGD-l2 attack: the falsifier for certificates.

A sound certificate at radius eps can never be broken by an input inside the
l2 ball; any prediction change found here on a certified sample is a soundness
violation.  The attack is unconstrained by the [0,1] box on purpose: the
certificate covers the whole ball.
"""

from __future__ import annotations

import numpy as np
import torch

from certlib.ir.graph import Graph


def _margin_loss(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    fy = f.gather(1, y[:, None]).squeeze(1)
    other = f.clone()
    other.scatter_(1, y[:, None], float("-inf"))
    return other.max(1).values - fy  # > 0 means the prediction changed


def pgd_l2(g: Graph, x: np.ndarray, target: np.ndarray, eps: float, steps: int = 50,
           restarts: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Search for x' with ||x' - x||_2 <= eps whose prediction differs from
    ``target`` (the model's prediction at x).  Returns (flipped mask, best x')."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.as_tensor(np.asarray(x, dtype=np.float64))
    y = torch.as_tensor(np.asarray(target, dtype=np.int64))
    B = x0.shape[0]
    best = x0.clone()
    best_loss = torch.full((B,), float("-inf"), dtype=torch.float64)
    alpha = 2.5 * eps / steps
    for r in range(restarts):
        if r == 0:
            delta = torch.zeros_like(x0)
        else:
            delta = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
            delta = delta / delta.flatten(1).norm(dim=1).view(-1, *[1] * (x0.ndim - 1)) * eps * 0.5
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = _margin_loss(g.torch_forward(x0 + delta), y)
            grad, = torch.autograd.grad(loss.sum(), delta)
            with torch.no_grad():
                gn = grad.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *[1] * (x0.ndim - 1))
                delta = delta + alpha * grad / gn
                dn = delta.flatten(1).norm(dim=1).view(-1, *[1] * (x0.ndim - 1))
                # project strictly inside the ball (a hair below eps)
                delta = delta * torch.clamp(eps * (1 - 1e-9) / dn.clamp_min(1e-30), max=1.0)
                lval = _margin_loss(g.torch_forward(x0 + delta), y)
                better = lval > best_loss
                best[better] = (x0 + delta)[better]
                best_loss = torch.where(better, lval, best_loss)
    with torch.no_grad():
        pred = g.torch_forward(best).argmax(1)
    flipped = (pred != y).numpy()
    return flipped, best.numpy()


def pgd_l2_executed(g: Graph, x: np.ndarray, target: np.ndarray, eps: float, precision: str, steps: int = 50,
                    restarts: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """PGD-l2 against the model EXECUTED in ``precision`` (float32, bfloat16,
    float16; :func:`certlib.ir.execute.execute`): the search direction is the
    float64 gradient, and every iterate (and x itself) is run in the format; a
    sample is flipped when some point strictly inside the ball gets another
    argmax there.  Returns (flipped mask, a flipping point per sample (x where none))."""
    from certlib.ir.execute import execute

    gen = torch.Generator().manual_seed(seed)
    x0 = torch.as_tensor(np.asarray(x, dtype=np.float64))
    y = np.asarray(target, dtype=np.int64)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    found = np.zeros(len(y), dtype=bool)
    where = x0.numpy().copy()

    def probe(pts: torch.Tensor):
        f = execute(g, pts.numpy(), precision)
        bad = ~found & ((np.argmax(np.where(np.isnan(f), -np.inf, f), axis=1) != y) | ~np.all(np.isfinite(f), axis=1))
        where[bad] = pts.numpy()[bad]
        found[bad] = True

    probe(x0)
    alpha = 2.5 * eps / steps
    yt = torch.as_tensor(y)
    for r in range(restarts):
        if r == 0:
            delta = torch.zeros_like(x0)
        else:
            delta = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
            delta = delta / delta.flatten(1).norm(dim=1).view(shape) * eps * 0.5
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = _margin_loss(g.torch_forward(x0 + delta), yt)
            grad, = torch.autograd.grad(loss.sum(), delta)
            with torch.no_grad():
                delta = delta + alpha * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-30).view(shape)
                dn = delta.flatten(1).norm(dim=1).view(shape)
                delta = delta * torch.clamp(eps * (1 - 1e-9) / dn.clamp_min(1e-30), max=1.0)
                probe(x0 + delta)
    return found, where


def empirical_lipschitz(g: Graph, x: np.ndarray, steps: int = 50, radius: float = 1e-2,
                        seed: int = 0) -> float:
    """A LOWER bound on the l2 Lipschitz constant of the logits: maximise
    ||f(x) - f(x')|| / ||x - x'|| by gradient ascent over x' near x."""
    return lipschitz_pair(g, x, steps, radius, seed)[0]


def lipschitz_pair(g: Graph, x: np.ndarray, steps: int = 50, radius: float = 1e-2, seed: int = 0):
    """The gradient ascent of :func:`empirical_lipschitz`, keeping its argmax:
    (best ratio, x, x') (x, x' None when the ratio stays 0)."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.as_tensor(np.asarray(x, dtype=np.float64))
    shape = (-1,) + (1,) * (x0.ndim - 1)
    d = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    d = d / d.flatten(1).norm(dim=1).view(shape) * radius
    with torch.no_grad():
        f0 = g.torch_forward(x0)
    best = (0.0, None, None)
    for _ in range(steps):
        d.requires_grad_(True)
        ratio = (g.torch_forward(x0 + d) - f0).flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1)
        grad, = torch.autograd.grad(ratio.sum(), d)
        with torch.no_grad():
            k = int(ratio.argmax())
            if float(ratio[k]) > best[0]:
                best = (float(ratio[k]), x0[k].numpy().copy(), (x0[k] + d[k]).numpy().copy())
            d = d + 0.1 * radius * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-30).view(shape)
            d = d / d.flatten(1).norm(dim=1).view(shape) * radius
    return best


# certlib.attack(...) is the public API function (certlib/_callable.py)
from certlib._callable import make_callable as _make_callable  # noqa: E402

_make_callable(__name__, "certlib.api:attack", "certlib.attack: see certlib.api")
