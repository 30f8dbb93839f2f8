"""``python -m certlib`` (and ``torchrun ... -m certlib verify ...``): the ``certlib`` command."""

from certlib.cli import main

main()
