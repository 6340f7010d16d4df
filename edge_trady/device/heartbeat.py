"""A liveness signal that means progress: ``heartbeat.json`` in the run folder, rewritten
atomically every N training steps (and at each epoch end) by the training loop, read by
``edge-trady health`` (the image's HEALTHCHECK). Under systemd with ``WatchdogSec=`` each beat
also pings the service manager's watchdog (``WATCHDOG=1`` on ``$NOTIFY_SOCKET``), so a runner
that stops making progress (hung, SIGSTOPped, swapping) is killed and restarted.

Age is measured on the monotonic clock when the reader runs in the same boot as the writer
(immune to the wall-clock jumps of a board without a real-time clock), on the wall clock
otherwise."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from ..core.atomic import write_json
from ..errors import EdgeTradyError

HEARTBEAT_FILE = "heartbeat.json"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")

TRAINING = "training"
FINISHED = "finished"  # the loop trained every epoch (the run may still be writing its model)
STOPPED = "stopped"  # stopped by a signal after a checkpoint
FAILED = "failed"  # the loop raised


@dataclass(frozen=True)
class Beat:
    """One heartbeat: where the loop was, and when."""

    status: str
    epoch: int  # epoch in progress, 1-based (after the last epoch: the number of epochs)
    epochs: int
    step: int  # steps done in ``epoch``
    steps_per_epoch: int
    time: float  # wall clock, seconds since the epoch
    monotonic: float  # time.monotonic() of the writer
    boot_id: str
    pid: int

    def age_s(self, now: float | None = None, monotonic: float | None = None) -> float:
        """Seconds since this beat was written."""
        if self.boot_id and self.boot_id == _boot_id():
            return (time.monotonic() if monotonic is None else monotonic) - self.monotonic
        return (time.time() if now is None else now) - self.time

    def where(self) -> str:
        return f"epoch {self.epoch}/{self.epochs}, step {self.step}/{self.steps_per_epoch}"


class Heartbeat:
    """Writes ``heartbeat.json`` in ``run_dir`` every ``every`` steps (0: only at epoch ends and
    status changes)."""

    def __init__(self, run_dir: Path, every: int, epochs: int, steps_per_epoch: int) -> None:
        self.path = Path(run_dir) / HEARTBEAT_FILE
        self.every = every
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self._notify = os.environ.get("NOTIFY_SOCKET")
        self._at = (0, 0)

    def step(self, epoch: int, step: int) -> None:
        """After training step ``step`` (1-based) of ``epoch`` (0-based)."""
        self._at = (epoch, step)
        if self.every and step % self.every == 0:
            self.beat(TRAINING, epoch, step)

    @contextlib.contextmanager
    def on_error(self, stopped: type[BaseException]) -> Iterator[None]:
        """An exception in the block leaves a last beat: ``stopped`` (an exception of type
        ``stopped``: a signal) or ``failed``; then it propagates."""
        try:
            yield
        except BaseException as exc:
            self.beat(STOPPED if isinstance(exc, stopped) else FAILED, *self._at)
            raise

    def beat(self, status: str, epoch: int, step: int) -> None:
        """Write a beat now; ``epoch`` is 0-based like the loop's."""
        self._at = (epoch, step)
        beat = Beat(
            status=status,
            epoch=min(epoch + 1, self.epochs),
            epochs=self.epochs,
            step=step,
            steps_per_epoch=self.steps_per_epoch,
            time=time.time(),
            monotonic=time.monotonic(),
            boot_id=_boot_id(),
            pid=os.getpid(),
        )
        write_json(self.path, asdict(beat))
        if self._notify:
            _sd_notify(self._notify, "WATCHDOG=1")


def read_heartbeat(run_dir: Path) -> Beat | None:
    """The last beat in ``run_dir``, or None when there is none (or it cannot be read)."""
    try:
        return Beat(**json.loads((Path(run_dir) / HEARTBEAT_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def health(run_dir: Path, max_age_s: float) -> tuple[bool, str]:
    """Is the run in ``run_dir`` making progress? (healthy, one line saying why)."""
    beat = read_heartbeat(run_dir)
    if beat is None:
        return False, f"no heartbeat in {run_dir} (not started, or not an edge-trady run folder)"
    age = beat.age_s()
    said = f"{beat.status} at {beat.where()}, {age:.0f} s ago"
    if beat.status == FINISHED:
        return True, f"training finished ({said})"
    if beat.status != TRAINING:
        return False, f"not running: {said}"
    if age > max_age_s:
        return False, f"no progress for {age:.0f} s (limit {max_age_s:.0f} s): last beat {said}"
    return True, f"making progress: {said}"


_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(s|m|h|)\s*$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """``"90"``/``"90s"`` -> 90.0, ``"10m"`` -> 600.0, ``"1h"`` -> 3600.0."""
    match = _DURATION.match(str(text).lower())
    if not match:
        raise EdgeTradyError(f"cannot read duration {text!r}: use seconds (600) or 90s, 10m, 1h")
    return float(match.group(1)) * _SECONDS[match.group(2)]


def _boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


def _sd_notify(address: str, message: str) -> None:
    """Send one sd_notify datagram (a path, or '@name' for an abstract socket); never raises:
    a missing service manager must not stop training."""
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError:
        pass
