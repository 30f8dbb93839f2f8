"""Data parallel training under torchrun (gloo, CPU): two ranks with the
global batch split between them end with the weights of one process that
trains on the whole global batch.

The runs use ``--precision fp64``: in float32, the two runs differ only in
the order of the gradient sums (~1e-7 relative), but AdamW divides each
gradient by its running RMS, so a component that is rounding noise around 0
gets a full learning-rate step of either sign, and the weights drift apart
by up to ~lr (seen: 3e-4 after 46 steps).  In float64 that noise is 1e-16 and
the runs agree to ~1e-15, which tests sampling, loss weighting of the
partial last batch, gradient averaging and the power-vector broadcast."""

import json
import os
import socket
import subprocess
import sys

import torch
from safetensors.torch import load_file

# 1437 digits / 64 = 22 full steps + one of 29 samples: ranks get 15 and 14
ARGS = ["train", "--preset", "digits", "--epochs", "2", "--batch-size", "64", "--no-verify", "--no-plot",
        "--threads", "1", "--device", "cpu", "--precision", "fp64"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_match_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = subprocess.run([sys.executable, "-m", "certlib.cli", *ARGS, "--out", str(one)], capture_output=True,
                        text=True, timeout=300, env=env)
    assert r1.returncode == 0, r1.stderr
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                         f"--master_port={_free_port()}", "-m", "certlib.cli", *ARGS, "--out", str(two)],
                        capture_output=True, text=True, timeout=300, env=env)
    assert r2.returncode == 0, r2.stderr[-3000:]
    # rank 0 alone prints the summary
    assert r2.stdout.count('"checkpoint"') == 1
    final = "checkpoints/step-000000046/model.safetensors"  # the float64 training state
    a, b = load_file(str(one / final)), load_file(str(two / final))
    assert a.keys() == b.keys() and any(k.endswith("power_u") for k in a)
    assert a["stem.weight"].dtype == torch.float64
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-9, atol=1e-12, msg=lambda m, k=k: f"{k}: {m}")
    # the float32 export of the same weights
    a, b = load_file(str(one / "checkpoint.safetensors")), load_file(str(two / "checkpoint.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7)
    # the logged epoch losses and test accuracies agree too (sums over both ranks)
    ra = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [23, 46]
    for x, y in zip(ra, rb):
        assert abs(x["loss"] - y["loss"]) < 1e-9
        assert x["eval_samples"] == y["eval_samples"] == 360
        assert abs(x["clean_accuracy"] - y["clean_accuracy"]) <= 1 / 360
