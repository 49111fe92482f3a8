"""Keeping the CLI's output ours while third-party tools run: their prints, warnings and log records."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator, Sequence

__all__ = ["NATIVE_LOG_DEFAULTS", "quiet", "quiet_native_logs"]


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


#: What LiteRT's converter and its C++ dependencies (TensorFlow, glog, oneDNN) read once, when they load: their
#: informational logs off unless the user set otherwise.
NATIVE_LOG_DEFAULTS = {"TF_CPP_MIN_LOG_LEVEL": "3", "GLOG_minloglevel": "2", "TF_ENABLE_ONEDNN_OPTS": "0"}


def quiet_native_logs() -> None:
    """Set :data:`NATIVE_LOG_DEFAULTS` where the environment has no value of its own. Called when a build starts,
    before any of those libraries loads; importing the toolchain changes nothing."""
    import os

    for name, value in NATIVE_LOG_DEFAULTS.items():
        os.environ.setdefault(name, value)
