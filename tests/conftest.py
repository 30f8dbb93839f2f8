import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402


@pytest.fixture
def cli_main(monkeypatch, capsys):
    """``certlib ARGS`` in-process through cli.main (the entry point that maps
    errors to exit codes): returns an object with returncode, stdout, stderr."""
    from types import SimpleNamespace

    from certlib import cli as cli_mod

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["certlib", *map(str, args)])
        try:
            cli_mod.main()
            code = 0
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)
    return run
