"""A run killed with SIGKILL mid-epoch and resumed with --resume ends with
exactly (bitwise) the weights of an uninterrupted run with the same seed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ARGS = ["--preset", "digits", "--epochs", "4", "--batch-size", "128", "--save-every", "5", "--no-verify",
        "--no-plot", "--threads", "1", "--device", "cpu", "--eval-every", "2"]


def _cmd(out, *extra):
    return [sys.executable, "-m", "certlib.cli", "train", *ARGS, "--out", str(out), *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _latest_step(out: Path) -> int:
    f = out / "checkpoints" / "LATEST"
    try:
        return int(f.read_text().strip().split("-")[1])
    except (OSError, IndexError, ValueError):
        return -1


def _epoch_records(out: Path) -> list[dict]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    drop = {"seconds", "images_per_s"}
    return [{k: v for k, v in r.items() if k not in drop} for r in recs if r["kind"] == "epoch"]


def test_kill_and_resume_is_bitwise_identical(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    r = subprocess.run(_cmd(ref), capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 0, r.stderr

    p = subprocess.Popen(_cmd(run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    t0 = time.time()
    try:
        # 12 steps per epoch: wait for a mid-epoch checkpoint (step 5, 10, 15, ...), then kill -9
        while _latest_step(run) < 5 and p.poll() is None and time.time() - t0 < 240:
            time.sleep(0.01)
        killed_after = _latest_step(run)
        p.send_signal(signal.SIGKILL)
        rc = p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    if rc != -signal.SIGKILL:
        pytest.fail(f"the run ended (rc {rc}) before it could be killed; make it longer")
    assert 5 <= killed_after < 48, killed_after
    print("killed after checkpoint at step", killed_after)
    assert not (run / "checkpoint.safetensors").exists()

    r = subprocess.run(_cmd(run, "--resume"), capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stderr

    a, b = load_file(str(ref / "checkpoint.safetensors")), load_file(str(run / "checkpoint.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume (killed after step {killed_after})"
    # the metrics log reads as one run: same epoch records, no duplicates
    assert _epoch_records(ref) == _epoch_records(run)


def test_resume_refuses_another_config(tmp_path):
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "certlib.cli", "train", "--preset", "digits", "--epochs", "1", "--no-verify",
           "--no-plot", "--threads", "1", "--out", str(out), "--batch-size", "512"]
    assert subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env()).returncode == 0
    r = subprocess.run(cmd[:-2] + ["--batch-size", "256", "--resume"], capture_output=True, text=True,
                       timeout=300, env=_env())
    assert r.returncode == 2 and "batch_size" in r.stderr and "Traceback" not in r.stderr
