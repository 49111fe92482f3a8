"""``python -m server.cli``: the same as the ``edgeherd`` command."""

from server.cli import main

main()
