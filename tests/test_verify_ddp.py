"""``torchrun --nproc_per_node 2 -m certlib verify`` (gloo, CPU): each rank
certifies every other sample, rank 0 gathers the records and writes the one
report, TSV and certificate -- equal to the single-process run's."""

import json
import os
import socket
import subprocess
import sys

from test_verify_stream import write_folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_gather_one_report(tmp_path):
    root = write_folder(tmp_path / "f", per_class=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # batches of one sample: each sample's float32 forward is then the same call in both runs
    args = ["verify", str(root / "m.onnx"), "--data", f"imagefolder:{root}", "--eps", "0.05", "--batch-size", "1",
            "--workers", "0", "--device", "cpu"]

    def outs(tag):
        return ["--tsv", str(tmp_path / f"{tag}.tsv"), "--json", str(tmp_path / f"{tag}.json"),
                "--proof", str(tmp_path / f"{tag}.cert.json")]

    r1 = subprocess.run([sys.executable, "-m", "certlib", *args, *outs("one")], capture_output=True, text=True,
                        timeout=300, env=env)
    assert r1.returncode == 0, r1.stderr
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                         f"--master_port={_free_port()}", "-m", "certlib", *args, *outs("two")], capture_output=True, text=True, timeout=300,
                        env=env)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert r2.stderr.count("verified robust accuracy") == 1  # rank 0 alone reports
    one, two = (tmp_path / "one.tsv").read_text(), (tmp_path / "two.tsv").read_text()
    assert one.count("\n") == 13 and one == two
    a, b = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    for k in ("n", "vra", "clean_accuracy", "data", "data_sha256", "lipschitz", "runtime_disagree"):
        assert a[k] == b[k], k
    # the gathered certificate (float64 path, rank 0's hashing pass) passes the independent check
    c, d = (json.loads((tmp_path / f"{t}.cert.json").read_text()) for t in ("one", "two"))
    assert c["data"]["sha256"] == a["data_sha256"] and len(c["samples"]) == 12
    assert c["samples"] == d["samples"] and c["summary"] == d["summary"] and c["data"] == d["data"]
    chk = subprocess.run([sys.executable, "-m", "certlib", "check", str(root / "m.onnx"),
                          str(tmp_path / "two.cert.json")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert chk.returncode == 0, chk.stderr
