"""Keeping the CLI's output ours while third-party tools run: their prints, warnings and log records."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator, Sequence

__all__ = ["quiet"]


@contextlib.contextmanager
def quiet(logger_names: Sequence[str], level: int) -> Iterator[None]:
    """Swallow stdout and warnings, and raise ``logger_names``' levels to ``level``, for the block; every logger's
    own level is put back afterwards."""
    loggers = [logging.getLogger(name) for name in logger_names]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(level)
        try:
            yield
        finally:
            for lg, old in zip(loggers, levels, strict=True):
                lg.setLevel(old)
