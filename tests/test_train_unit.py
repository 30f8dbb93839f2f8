"""Trainer pieces: config/presets against docs/presets.md, every field a CLI flag,
schedules, losses against their formulas, precision handling, benchmarks'
CPU modes."""

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from certlib.train import RECIPES, ConfigError, TrainConfig, eps_at, lr_at, preset_config
from certlib.train import losses

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_field_is_a_cli_flag():
    import typer.main

    from certlib.cli import app

    cmd = typer.main.get_command(app).commands["train"]
    names = {p.name for p in cmd.params}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert fields <= names, f"fields without a flag: {sorted(fields - names)}"


def test_paper_recipes():
    # docs/presets.md: the NeurIPS'23 recipe; margin loss for the code's runs,
    # EMMA for the paper text's L12 W512 models; float32; 500-iteration estimate
    c = preset_config("cifar10-l18w256")
    assert (c.lr, c.weight_decay, c.batch_size, c.epochs, c.warmup_epochs, c.min_lr_ratio, c.grad_clip) == \
        (1e-3, 1e-4, 256, 800, 20, 1e-5, 3.0)
    assert (c.eps, c.eps_start, c.eps_end, c.power_iters, c.loss) == (36 / 255, 0.1, 1.5, 10, "margin")
    assert (c.augment, c.crop_pad, c.precision, c.eval_power_iters) == ("crop-flip", 4, "fp32", 500)
    for name in ("cifar10", "cifar100"):
        p = preset_config(name)
        assert (p.loss, p.precision, p.epochs, p.eps) == ("emma", "fp32", 800, 36 / 255)
    assert preset_config("cifar100-l18w256").loss == "margin"
    t = preset_config("tinyimagenet")
    assert (t.augment, t.crop_pad, t.epochs, t.batch_size, t.loss) == ("crop-flip", 8, 800, 256, "margin")
    for name, eps in (("imagenet", 36 / 255), ("imagenet-eps1", 1.0)):
        i = preset_config(name)
        assert (i.weight_decay, i.batch_size, i.epochs, i.augment, i.resize, i.extra_eps) == \
            (0.0, 1024, 400, "resize-crop-flip", 256, [])
        assert (i.eps, i.loss, i.precision, i.eps_start, i.eps_end) == (eps, "margin", "fp32", 0.1, 1.5)
    for name in RECIPES:
        preset_config(name).validate()
        if name != "digits":
            assert preset_config(name).precision == "fp32", name
    with pytest.raises(ConfigError):
        preset_config("cifar10", loss="nope").validate()
    with pytest.raises(ConfigError, match="width"):
        preset_config("digits", width=3).validate()  # MinMax needs an even width


def test_digits_recipe():
    # the quick start's recipe (README: sound VRA >= 88% at eps 0.3 on 2 CPU
    # cores in under 5 minutes): the paper's loss and eps ramp, one thread,
    # and the weight decay that keeps the logit scale bounded
    d = preset_config("digits")
    assert (d.loss, d.eps, d.eps_start, d.eps_end, d.power_iters) == ("emma", 0.3, 0.1, 1.5, 10)
    assert (d.epochs, d.batch_size, d.lr, d.weight_decay, d.warmup_epochs, d.threads) == \
        (300, 128, 3e-3, 1.0, 5, 1)
    assert (d.augment, d.preset, d.data) == ("none", "digits", "digits")
    assert d.model_overrides() == {}


def test_schedules():
    c = preset_config("cifar10", epochs=10, warmup_epochs=2)
    S = 5
    lrs = [lr_at(c, s, S) for s in range(10 * S)]
    assert lrs[0] == pytest.approx(1e-3 / 10) and lrs[9] == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(c, 10 * S, S) == pytest.approx(1e-3 * 1e-5)
    assert eps_at(c, 0) == pytest.approx(0.1 * c.eps)
    assert eps_at(c, 5) == eps_at(c, 9) == pytest.approx(1.5 * c.eps)
    assert eps_at(c, 0) < eps_at(c, 2) < eps_at(c, 5)


def _setup(seed=0, B=7, C=5):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(B, C, generator=g) * 2
    lab = torch.randint(0, C, (B,), generator=g)
    W = torch.rand(C, C, generator=g) + 0.5
    K = (W + W.T) / 2 * (1 - torch.eye(C))
    return y, lab, K


def test_emma_matches_the_paper():
    y, lab, K = _setup()
    eps = 0.4
    ref = []
    for b in range(len(y)):
        t = lab[b]
        z = y[b].clone()
        for i in range(y.shape[1]):
            if i != t:
                e = min(max(float((y[b, t] - y[b, i]) / K[t, i]), 0.01 * eps), eps)
                z[i] = y[b, i] + e * K[t, i]
        ref.append(F.cross_entropy(z[None], lab[b:b + 1]))
    ref = torch.stack(ref)
    torch.testing.assert_close(losses.emma(y, lab, K, eps, reduction="none"), ref)
    torch.testing.assert_close(losses.emma(y, lab, K, eps), ref.mean())
    torch.testing.assert_close(losses.emma(y, lab, K, eps, reduction="sum"), ref.sum())
    # margin: every eps_i = eps; emma <= margin (eps_i <= eps)
    m = losses.margin(y, lab, K, eps, reduction="none")
    assert torch.all(losses.emma(y, lab, K, eps, reduction="none") <= m + 1e-6)


def test_emma_gradient_reaches_K_not_eps_i():
    y, lab, K = _setup(1)
    Kp = K.clone().requires_grad_(True)
    losses.emma(y, lab, Kp, 0.3).backward()
    assert Kp.grad is not None and Kp.grad.abs().sum() > 0


def test_power_iteration_stays_float32_under_bf16():
    from certlib.models.liresnet import build
    from certlib.train.distributed import DistInfo
    from certlib.train.step import TrainStep, margin_constants

    torch.manual_seed(0)
    m = build("digits")
    dev = torch.device("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        K = margin_constants(m, 2, dev)
        assert m(torch.rand(2, 1, 8, 8)).dtype == torch.bfloat16
    assert K.dtype == torch.float32
    assert all(b.dtype == torch.float32 for b in m.buffers())
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    step = TrainStep(m, m, opt, loss="emma", trades_lambda=1.0, power_iters=2, grad_clip=3.0, test_eps=0.3,
                     device=dev, precision="bf16", info=DistInfo())
    st = step(torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]), 4, 0.3, 1e-3)
    assert st.shape == (4,) and torch.isfinite(st).all() and float(st[3]) == 4


def test_train_step_benchmark_runs():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--width", "16", "--depth",
                        "1", "--batch", "4", "--steps", "1", "--warmup", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["time_ratio"] > 0 and res["plain_images_per_s"] > 0 and res["certified_images_per_s"] > 0
    assert res["lipschitz_term_s"] > 0 and res["power_iterations_s"] > 0 and res["arithmetic_floor_ratio"] > 1
    assert "MEASURED" in r.stdout and "NOT MEASURED" in r.stdout


def test_gpu_check_runs_on_cpu_quick():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["sanity"]["decreased"] is True
    assert res["cifar10"]["certified_images_per_s"] > 0 and res["imagenet"]["step_s"] > 0
    assert set(res["projected_gpu_hours"]) == {"cifar10_800_epochs", "imagenet_400_epochs"}
    assert "GPU-hours" in r.stdout


@pytest.mark.parametrize("mode", ["conv", "gemm", "loop", "fold"])
def test_fast_power_iteration_equals_the_models(mode):
    from certlib.models.liresnet import build
    from certlib.train.power import PowerIteration, lipschitz_estimate

    torch.manual_seed(0)
    ref = build("cifar10", width=16, depth=3, dense_dim=32)
    fast = build("cifar10", width=16, depth=3, dense_dim=32)
    fast.load_state_dict(ref.state_dict())
    a = ref.lipschitz_estimate(7)
    b = lipschitz_estimate(fast, 7, mode)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=0)
    a.backward()
    b.backward()
    for (k, x), (_, y) in zip(ref.state_dict().items(), fast.state_dict().items()):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    for (k, p), (_, q) in zip(ref.named_parameters(), fast.named_parameters()):
        assert (p.grad is None) == (q.grad is None), k
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-7)
    c = PowerIteration(fast, 3, mode)()  # the per-step object gives the same as the function
    d = ref.lipschitz_estimate(3)
    torch.testing.assert_close(c, d, rtol=1e-5, atol=0)
