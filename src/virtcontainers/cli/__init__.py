"""The ``vc`` command line: thin over the public API."""

from virtcontainers.cli.app import app, main

__all__ = ["app", "main"]
