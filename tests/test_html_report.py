"""The HTML report (certlib/report/html.py, ``certlib verify --report``): self-contained,
and rendered by a real headless Chromium (Debian's ``chromium``; .ci/run installs it):
no console messages, a non-blank screenshot with the figure's curve in it, and
the key numbers in the DOM."""

import re
import shutil
import subprocess

import numpy as np
import onnx
import pytest
from PIL import Image
from typer.testing import CliRunner

import certlib
from api_models import trained_mlp
from certlib.api_torch import export_module
from certlib.cli import app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (CI installs Debian's "
                                                              "chromium in .ci/run: apt-get install -y chromium)")
CURVE_RGB = (0x24, 0x56, 0xA6)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    d = tmp_path_factory.mktemp("html")
    onnx.save(export_module(trained_mlp(), (1, 8, 8)), str(d / "m.onnx"))
    res = CliRunner().invoke(app, ["verify", str(d / "m.onnx"), "--eps", "0.1", "--limit", "100",
                                   "--report", str(d / "report.html")])
    assert res.exit_code == 0, res.output
    rep = certlib.verify(d / "m.onnx", "digits", 0.1, limit=100)
    return d / "report.html", rep


def chromium(*args, timeout=90):
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--enable-logging=stderr", "--v=0", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=timeout)


def console_messages(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln]


def test_page_is_self_contained_and_says_the_claim(page):
    path, rep = page
    text = path.read_text()
    assert not re.search(r"""(src|href)\s*=|url\(|@import|<link|<img|<iframe""", text)   # nothing to fetch
    assert "http" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert f"{100 * rep.vra:.2f}%" in text and f"{100 * rep.clean_accuracy:.2f}%" in text
    assert "proved" in text and "l2 distance" in text and f"{rep.lipschitz:.9g}" in text
    for lb in rep.layers:
        assert lb.name in text


@needs_chromium
def test_chromium_renders_the_report(page, tmp_path):
    path, rep = page
    res = chromium("--dump-dom", path.as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    assert console_messages(res.stderr) == []
    dom = res.stdout
    assert 'data-rendered="yes"' in dom                          # the page's script ran and saw the figure
    assert f"{100 * rep.vra:.2f}%" in dom and f"{rep.lipschitz:.9g}" in dom
    assert dom.count("<tr>") >= len(rep.layers) + 10
    shot = tmp_path / "shot.png"
    res = chromium(f"--screenshot={shot}", "--window-size=1000,1400", path.as_uri())
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    assert console_messages(res.stderr) == []
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape == (1400, 1000, 3)
    assert img.std() > 10 and (img.sum(axis=2) < 600).mean() > 0.01        # not blank: dark text and shapes
    curve = (np.abs(img - np.array(CURVE_RGB)).sum(axis=2) < 40).sum()
    assert curve > 200                                                  # the figure's line was drawn


@needs_chromium
def test_the_console_check_can_fail(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>throw new Error('boom')</script></body></html>")
    res = chromium("--dump-dom", bad.as_uri())
    assert any("boom" in m for m in console_messages(res.stderr))


def test_estimate_only_skips_the_report(page, tmp_path):
    path, _ = page
    out = tmp_path / "r.html"
    res = CliRunner().invoke(app, ["verify", str(path.parent / "m.onnx"), "--eps", "0.1", "--limit", "10",
                                   "--estimate-only", "--report", str(out)])
    assert res.exit_code == 0 and not out.exists()
