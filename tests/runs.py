"""Helpers for tests that train in the test process through `dlscale.cli.main`."""
import logging
from contextlib import contextmanager


@contextmanager
def own_logging():
    """`main` installs its own root log handlers; put the previous ones back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
