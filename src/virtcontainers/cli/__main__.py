"""``python -m virtcontainers.cli`` is ``vc``."""

from virtcontainers.cli.app import main

main()
