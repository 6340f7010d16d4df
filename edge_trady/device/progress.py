"""What a person watching a run sees on stderr.

On a terminal, a ``tqdm`` bar per epoch: images done, images/s, the epoch's elapsed time and ETA,
then the current loss, the run's ETA and the process's current RSS against the plan's predicted
peak. Off a terminal (systemd, ``docker logs``, a pipe), one plain line every ``every_s`` seconds
with the same facts (``--progress-every`` or ``$EDGE_TRADY_PROGRESS_EVERY``, default 30 s).
``line`` prints a message (e.g. the loop's per-epoch summary) on both. ``quiet`` prints nothing.

The training loop calls ``start`` once, then ``step`` after every step; nothing else.
"""

from __future__ import annotations

import io
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from ..core.budget import format_bytes
from ..errors import EdgeTradyError
from .memwatch import current_rss_bytes

EVERY_ENV = "EDGE_TRADY_PROGRESS_EVERY"
DEFAULT_EVERY_S = 30.0


def every_from_env() -> float:
    """Seconds between plain progress lines: ``$EDGE_TRADY_PROGRESS_EVERY``, else 30."""
    value = os.environ.get(EVERY_ENV, "").strip()
    if not value:
        return DEFAULT_EVERY_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not (seconds >= 0 and math.isfinite(seconds)):
        raise EdgeTradyError(f"{EVERY_ENV}={value!r}: expected a number of seconds >= 0")
    return seconds


@dataclass
class _Run:
    """The shape of the training run being shown, where this process started it and where the
    current epoch's measurements start."""

    epochs: int
    steps_per_epoch: int
    images_per_epoch: int
    started_at: float
    first_step: int  # global step index this process started at (> 0 when resumed)
    epoch: int
    epoch_started_at: float
    epoch_first_step: int  # steps of the epoch done before this process measured it (resumed: > 0)
    epoch_first_images: int


@dataclass
class Progress:
    quiet: bool = False
    every_s: float | None = None  # None: $EDGE_TRADY_PROGRESS_EVERY, else 30 s; 0: every step
    predicted_peak_bytes: int | None = None  # the plan's predicted peak, shown beside the RSS
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    live: bool | None = None  # tqdm bar; None: when ``stream`` is a terminal
    clock: Callable[[], float] = time.monotonic
    _run: _Run | None = field(default=None, init=False, repr=False)
    _bar: Any = field(default=None, init=False, repr=False)
    _last_event_at: float = field(default=0.0, init=False, repr=False)  # last start, step or line
    _last_shown_at: float = field(default=0.0, init=False, repr=False)  # last plain line or bar postfix

    def __post_init__(self) -> None:
        if self.every_s is None:
            self.every_s = every_from_env()
        if self.live is None:
            self.live = not self.quiet and _is_terminal(self.stream)

    def start(
        self, epochs: int, steps_per_epoch: int, images_per_epoch: int, epoch: int = 0, step: int = 0, images: int = 0
    ) -> None:
        """A run of ``epochs`` x ``steps_per_epoch`` steps begins; resumed: at step ``step`` of
        ``epoch`` (0-based) with ``images`` of that epoch done."""
        self._close_bar()
        now = self.clock()
        first = epoch * steps_per_epoch + step
        self._run = _Run(epochs, steps_per_epoch, images_per_epoch, now, first, epoch, now, step, images)
        self._last_event_at = self._last_shown_at = now

    def step(self, epoch: int, step: int, images: int, loss: float) -> None:
        """``step`` steps (``images`` images) of epoch ``epoch`` (0-based) are done; ``loss`` is the last."""
        run = self._run
        if self.quiet or run is None:
            return
        now = self.clock()
        if epoch != run.epoch:  # a new epoch: it began when the last one was reported
            run.epoch, run.epoch_started_at = epoch, self._last_event_at
            run.epoch_first_step = run.epoch_first_images = 0
            self._close_bar()
        self._last_event_at = now
        if self.live:
            self._show_bar(run, step, images, loss, now)
        elif now - self._last_shown_at >= self.every_s:
            self._last_shown_at = now
            self.stream.write(self._status(run, step, images, loss, now) + "\n")
            self.stream.flush()

    def line(self, text: str) -> None:
        """Print ``text`` on a line of its own (closes the epoch's bar)."""
        if self.quiet:
            return
        self._close_bar()
        self.stream.write(text + "\n")
        self.stream.flush()
        self._last_event_at = self.clock()

    # --- rendering -------------------------------------------------------------------------------

    def _status(self, run: _Run, step: int, images: int, loss: float, now: float) -> str:
        seconds = now - run.epoch_started_at
        rate = _rate(images - run.epoch_first_images, seconds)
        epoch_eta = _eta(run.steps_per_epoch - step, step - run.epoch_first_step, seconds)
        return (
            f"epoch {run.epoch + 1}/{run.epochs} step {step}/{run.steps_per_epoch} "
            f"({step / run.steps_per_epoch:.0%}) {rate} img/s loss {loss:.4f} "
            f"ETA epoch {epoch_eta} run {self._run_eta(run, step, now)} {self._memory()}"
        )

    def _run_eta(self, run: _Run, step: int, now: float) -> str:
        """Remaining steps at this process's mean pace so far (evaluations included)."""
        done = run.epoch * run.steps_per_epoch + step
        return _eta(run.epochs * run.steps_per_epoch - done, done - run.first_step, now - run.started_at)

    def _memory(self) -> str:
        rss = f"RSS {format_bytes(current_rss_bytes())}"
        peak = self.predicted_peak_bytes
        return f"{rss} of predicted peak {format_bytes(peak)}" if peak else rss

    def _show_bar(self, run: _Run, step: int, images: int, loss: float, now: float) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=run.images_per_epoch,
                initial=run.epoch_first_images,
                desc=f"epoch {run.epoch + 1}/{run.epochs}",
                unit="img",
                file=self.stream,
                leave=False,
                dynamic_ncols=_columns(self.stream) > 0,
                ncols=None if _columns(self.stream) > 0 else 120,  # a console of size 0 x 0 (serial, ptys)
                nrows=1000,  # tqdm hides bars below the last row: of which there are 0 there
                mininterval=0.25,
            )
            # the bar is opened after the epoch's first step: date its rate and times from the epoch's start
            self._bar.start_t = self._bar.last_print_t = time.time() - (now - run.epoch_started_at)
        self._bar.update(images - self._bar.n)
        if now - self._last_shown_at >= 0.5 or step == 1:
            self._last_shown_at = now
            rss = f"RSS {current_rss_bytes() / 2**20:.0f} MiB"
            if self.predicted_peak_bytes:
                rss += f" (plan {self.predicted_peak_bytes / 2**20:.0f})"
            self._bar.set_postfix_str(f"loss {loss:.4f}, run ETA {self._run_eta(run, step, now)}, {rss}")

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _rate(images: int, seconds: float) -> str:
    return f"{images / seconds:.1f}" if seconds > 0 else "-"


def _eta(remaining_steps: int, steps_done: int, seconds: float) -> str:
    """``H:MM:SS`` (or ``M:SS``) for ``remaining_steps`` at the pace of ``steps_done`` in ``seconds``."""
    if remaining_steps <= 0:
        return "0:00"
    if steps_done <= 0 or seconds <= 0:
        return "?"
    total = round(remaining_steps * seconds / steps_done)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return 0


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
