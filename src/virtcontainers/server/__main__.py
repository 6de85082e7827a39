"""``python -m virtcontainers.server ID ...``: see :mod:`virtcontainers.server.main`."""

from virtcontainers.server.main import main

main()
