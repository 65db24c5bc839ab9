"""What libraries show on the console: progress bars that stay out of CI logs and pipes,
and library log messages silenced where their advice does not apply."""

from __future__ import annotations

import contextlib
import logging

from tqdm.auto import tqdm


def progress_bar(iterable=None, *, enabled: bool = True, **kwargs) -> tqdm:
    # disable=None lets tqdm turn itself off when stderr is not a terminal
    return tqdm(iterable, disable=None if enabled else True, leave=False, dynamic_ncols=True, **kwargs)


@contextlib.contextmanager
def quiet_logger(name: str | None = None, level: int = logging.ERROR):
    """Raise logger ``name`` (the root logger when None) to ``level`` for the block."""
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)
