"""Downloads from the Hugging Face hub without its retry chatter: offline, a user gets our one line, not a page of
'Retrying in 8s' warnings first."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

HUB_LOGGERS = ("huggingface_hub", "datasets")


@contextmanager
def quiet_hub() -> Iterator[None]:
    """Raise the hub libraries' log level above ERROR for the duration (import them before: importing resets it):
    what fails reaches the user as our one line, which names the file and the fix, not as their log line first."""
    loggers = [logging.getLogger(name) for name in HUB_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
