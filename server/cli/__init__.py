"""The ``vm-tenant`` command, split by concern (see :mod:`server.cli.main`)."""

from server.cli.main import main

__all__ = ["main"]
