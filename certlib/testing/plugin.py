"""pytest plugin ``certlib`` (entry point ``pytest11``): the ``certlib_report`` fixture.

A test that takes ``certlib_report`` has every :func:`certlib.verify` call it
makes (directly or through :func:`certlib.testing.assert_certified`) recorded
with its test id; ``certlib_report.add(report)`` records one explicitly.  At
the end of the run the records go to ONE JSON file: ``--certlib-report=PATH``
(or ini ``certlib_report = PATH``), default ``certlib-report.json`` in the
rootdir; nothing is written when no test recorded anything.  Schema:
``{"certlib_version", "entries": [{"test", "model", "sha256", "data", "n",
"eps", "clean_accuracy", "vra", "certified", "lipschitz", "method", "sound"}]}``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

_KEY = pytest.StashKey[list]()


def pytest_addoption(parser):
    group = parser.getgroup("certlib")
    group.addoption("--certlib-report", action="store", default=None, metavar="PATH",
                    help="JSON file collecting what the run certified (default certlib-report.json in the rootdir)")
    parser.addini("certlib_report", "default path of the certlib JSON report", default="certlib-report.json")


def pytest_configure(config):
    config.stash[_KEY] = []


class CertlibRecorder:
    def __init__(self, entries: list, test: str):
        self.entries, self.test = entries, test

    def add(self, report) -> dict:
        j = report.as_dict()
        e = {"test": self.test, "model": j["model"], "sha256": j["sha256"], "data": j["data"], "n": j["n"],
             "eps": j["eps"], "clean_accuracy": j["clean_accuracy"], "vra": j["vra"],
             "certified": int(report.certified.sum()), "lipschitz": j["lipschitz"]["body"],
             "method": j["lipschitz"]["method"], "sound": j["lipschitz"]["sound"]}
        self.entries.append(e)
        return e

    def __len__(self) -> int:
        return sum(e["test"] == self.test for e in self.entries)


@pytest.fixture
def certlib_report(request):
    """Records every certlib.verify made while the test runs (see the module doc)."""
    from certlib import api

    rec = CertlibRecorder(request.config.stash[_KEY], request.node.nodeid)
    api._LISTENERS.append(rec.add)
    try:
        yield rec
    finally:
        api._LISTENERS.remove(rec.add)


def report_path(config) -> Path:
    p = config.getoption("--certlib-report") or config.getini("certlib_report")
    p = Path(p)
    return p if p.is_absolute() else Path(config.rootpath) / p


def pytest_sessionfinish(session):
    entries = session.config.stash.get(_KEY, [])
    if not entries or hasattr(session.config, "workerinput"):
        return
    from certlib import __version__

    path = report_path(session.config)
    path.write_text(json.dumps({"certlib_version": __version__, "entries": entries}, indent=2) + "\n")


def pytest_terminal_summary(terminalreporter, config):
    entries = config.stash.get(_KEY, [])
    if entries:
        terminalreporter.write_line(f"certlib: {len(entries)} verification(s) recorded in {report_path(config)}")
