"""Progress of long steps (defense stages, search iterations, sweep cells), through the
``bdjax`` logger.

Library code reports here and shows nothing by itself (a logger without a handler keeps
INFO quiet); the ``bdjax`` command attaches a stderr handler unless ``--quiet``, so stdout
(``--json``) carries only the result.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time

LOGGER = logging.getLogger("bdjax")


@contextlib.contextmanager
def stage(what: str):
    """Report ``what ...`` now and ``what: 12.3 s`` when the block ends."""
    LOGGER.info("%s ...", what)
    started = time.perf_counter()
    yield
    LOGGER.info("%s: %.1f s", what, time.perf_counter() - started)


class Steps:
    """A loop of ``total`` items: call ``done()`` after each. Reports ``what 3/10, 12 s, ETA 28 s``
    every ``every`` seconds, and after the last item if it reported before: a short loop says nothing."""

    def __init__(self, what: str, total: int, every: float = 10.0):
        self.what, self.total, self.every = what, total, every
        self.count = 0
        self.started = self.reported = time.perf_counter()
        self.spoke = False

    def done(self, count: int = 1):
        """``count`` more items finished (call it once their results are ready)."""
        self.count += count
        now = time.perf_counter()
        if now - self.reported >= self.every or (self.spoke and self.count >= self.total):
            elapsed = now - self.started
            eta = elapsed / self.count * max(self.total - self.count, 0)
            LOGGER.info("%s %d/%d, %.0f s, ETA %.0f s", self.what, self.count, self.total, elapsed, eta)
            self.reported, self.spoke = now, True


def shown() -> bool:
    """Whether progress is shown (a loop then waits for each step's result, so that its times are real)."""
    return LOGGER.isEnabledFor(logging.INFO)


def show_on_stderr(enabled: bool = True):
    """Print the ``bdjax`` logger's progress on stderr (the command line's default)."""
    LOGGER.handlers = [handler for handler in LOGGER.handlers if not getattr(handler, "bdjax_stderr", False)]
    if enabled:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[bdjax %(asctime)s] %(message)s", "%H:%M:%S"))
        handler.bdjax_stderr = True
        LOGGER.addHandler(handler)
        LOGGER.setLevel(logging.INFO)
