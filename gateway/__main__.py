"""``python -m gateway`` is the ``ultralight`` command."""

from gateway.cli import main

main()
