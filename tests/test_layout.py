"""The house rules of the repository (docs/architecture.md): no import cycle
anywhere in certlib, files split by meaning, and no reference to a file outside
the repository or to a machine path."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: installed package name -> source folder (pyproject's package-dir)
PACKAGES = {"certlib": ROOT / "certlib", "certlib.verifiers": ROOT / "verifiers",
            "certlib.models": ROOT / "models", "certlib.proofs": ROOT / "proofs"}
#: the one file allowed to stay long: the independent checker reads better whole
LONG_OK = {"proofs/checker.py"}
MAX_LINES = 400


def _modules() -> dict:
    """module name -> source path, for every module of the installed package."""
    mods = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if pkg == "certlib" and parts and parts[0] in ("verifiers", "models", "proofs"):
                continue
            mods[name] = path
    return mods


def _imports(path: Path, name: str, mods: dict) -> set:
    """Every certlib module that ``name`` imports, at module level or inside a
    function (a lazy import is still an arrow of the design)."""
    is_pkg = path.name == "__init__.py"
    base = name if is_pkg else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = base
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                mod = f"{pkg}.{node.module}" if node.module else pkg
            else:
                mod = node.module or ""
            # "from pkg import sub" imports the submodule when there is one
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names]
        for t in targets:
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def test_no_import_cycle():
    mods = _modules()
    graph = {name: _imports(path, name, mods) for name, path in mods.items()}
    # a package's __init__ importing its own submodules is registration, not a cycle,
    # as long as no submodule imports the package back
    for name, path in mods.items():
        if path.name == "__init__.py":
            graph[name] = {t for t in graph[name] if not t.startswith(name + ".")} | {
                t for t in graph[name] if t.startswith(name + ".") and name not in graph[t]}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_ops_never_import_the_walker():
    mods = _modules()
    for name, path in mods.items():
        if name.startswith("certlib.onnx.ops") or name.startswith("certlib.ir"):
            bad = {t for t in _imports(path, name, mods) if t in ("certlib.onnx.walk", "certlib.onnx.importer")}
            assert not bad, f"{name} imports {bad}: handlers and the IR sit below the walker"


@pytest.mark.parametrize("mod", ["certlib.onnx.importer", "certlib.onnx.export", "certlib.ir.compose",
                                 "certlib.certificate", "certlib.cli", "certlib.proofs.checker",
                                 "certlib.verifiers.sdp", "certlib.data", "certlib.train"])
def test_each_module_imports_alone(mod):
    r = subprocess.run([sys.executable, "-c", f"import {mod}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def _tracked() -> list:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [ROOT / p for p in out.stdout.splitlines() if (ROOT / p).is_file()]


def test_python_files_are_split_by_meaning():
    long = []
    for p in _tracked():
        rel = p.relative_to(ROOT).as_posix()
        if p.suffix == ".py" and rel not in LONG_OK:
            n = len(p.read_text().splitlines())
            if n > MAX_LINES:
                long.append(f"{rel}: {n} lines")
    assert not long, "split these files by meaning: " + "; ".join(long)


def test_no_reference_outside_the_repository():
    # the names are assembled so that this file does not match itself
    outside = ["SOUND" + "NESS.md", "DES" + "IGN.md", "PA" + "PER.md", "../" + "shared"]
    machine = ["/wo" + "rk/", "/ro" + "ot/", "/ho" + "me/", "C:" + "\\Users"]
    bad = []
    for p in _tracked():
        if p.suffix not in (".py", ".md", ".toml", ".txt", ".cfg", "") and p.name != "run":
            continue
        try:
            text = p.read_text()
        except UnicodeDecodeError:
            continue
        for s in outside + machine:
            if s in text:
                bad.append(f"{p.relative_to(ROOT)} mentions {s!r}")
    assert not bad, "; ".join(bad)
