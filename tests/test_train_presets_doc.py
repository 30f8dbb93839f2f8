"""The preset -> published run tables (README.md, docs/presets.md) agree with
the code: architecture (PRESETS), train/test eps, loss, precision, epochs
(RECIPES) and the target VRA (PAPER_VRA); every paper preset has a row; no
file cites a document that is not in the repository."""

import ast
import re
from pathlib import Path

import pytest

from certlib.models.liresnet import PAPER_VRA, PRESETS
from certlib.train import preset_config

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| `([\w-]+)` \| L(\d+) W(\d+) D(\d+) \| ([\d./]+) \| ([\d./]+) \| (\w+) \| (\w+) \| (\d+) "
                 r"\| [^|]+ \| ([\d.]+)% \|$", re.M)
CITE = re.compile(r"`(tests/test_\w+\.py)::(\w+)`")


def _eps(text: str) -> float:
    a, _, b = text.partition("/")
    return float(a) / float(b) if b else float(a)


def _target(name: str) -> tuple[str, float]:
    (eps, v), = PAPER_VRA[name].items()  # one published run per preset
    return eps, v["code_readme"] if v["code_readme"] is not None else v["paper"]


@pytest.mark.parametrize("doc", ["README.md", "docs/presets.md"])
def test_readme_table_matches_the_presets(doc):
    rows = {m.group(1): m.groups()[1:] for m in ROW.finditer((ROOT / doc).read_text())}
    paper = set(PRESETS) - {"digits"}
    assert set(rows) == paper == set(PAPER_VRA), f"{doc}: rows {sorted(rows)} vs presets {sorted(paper)}"
    for name, (depth, width, dense, train_eps, test_eps, loss, precision, epochs, target) in rows.items():
        arch, cfg = PRESETS[name], preset_config(name)
        assert (arch.depth, arch.width, arch.dense_dim) == (int(depth), int(width), int(dense)), name
        assert arch.init == "orthogonal", name
        assert _eps(train_eps) == pytest.approx(cfg.eps, rel=1e-12) and cfg.extra_eps == [], name
        assert _eps(test_eps) == pytest.approx(cfg.eps, rel=1e-12), name
        assert (cfg.loss, cfg.precision, cfg.epochs, cfg.eval_power_iters) == (loss, precision, int(epochs), 500)
        eps_key, value = _target(name)
        assert _eps(eps_key) == pytest.approx(cfg.eps, rel=1e-12), name
        assert float(target) == value, name


def test_presets_doc_cites_existing_tests():
    text = (ROOT / "docs" / "presets.md").read_text()
    cites = CITE.findall(text)
    assert cites
    for file, name in cites:
        funcs = {n.name for n in ast.walk(ast.parse((ROOT / file).read_text())) if isinstance(n, ast.FunctionDef)}
        assert name in funcs, f"docs/presets.md cites missing {file}::{name}"
