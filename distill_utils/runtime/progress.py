"""Progress bars that suit a terminal and a log file alike.

On a terminal: live ``tqdm`` bars. When stderr is not a terminal (a cluster job's log, ``> log 2>&1``):
per-batch bars are off, and the outer bars (phase iterations, experts, students) write one plain
line at most every ``LOG_INTERVAL_S`` seconds and a last one when they finish, instead of a
carriage-return update per step; the scripts' own log lines (one per epoch, per ``--eval_it``) carry
the rest.
"""
from __future__ import annotations

import sys

from tqdm.auto import tqdm

LOG_INTERVAL_S = 60.0


class _LogLines:
    """A stream for tqdm that turns each carriage-return update into one line of its own."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def on_terminal() -> bool:
    return sys.stderr.isatty()


def progress(iterable=None, *, inner: bool = False, **kwargs):
    """``tqdm(iterable, **kwargs)`` for a terminal; for a log, nothing if ``inner`` (a bar inside a loop
    that has its own), else a line every ``LOG_INTERVAL_S`` seconds and at the end."""
    if on_terminal():
        return tqdm(iterable, **kwargs)
    if inner:
        return tqdm(iterable, **{**kwargs, "disable": True})
    kwargs.update(file=_LogLines(sys.stderr), mininterval=LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S,
                  dynamic_ncols=False, ncols=100, leave=True, ascii=True)
    return tqdm(iterable, **kwargs)
