"""Run output shared by every engine: ``metrics.jsonl`` and ``selection.jsonl`` (one line/epoch)."""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.atomic import append_line, write_text
from ..core.selection import Selection

METRICS_FILE = "metrics.jsonl"
SELECTION_FILE = "selection.jsonl"
PROCESS_ID = uuid.uuid4().hex[:12]  # names this process in the epoch records: where it changes, a run resumed


@dataclass
class EpochMetrics:
    """What every engine logs after each epoch."""

    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float | None
    val_acc: float | None
    lr: float  # learning rate of the epoch's last step
    time_s: float
    images: int
    units_used: float  # cost of the selected channels (budget unit: units or bytes)
    budget_units: float | None
    budget_unit: str
    channels_selected: int
    channels_per_layer: dict[str, int]
    engine: str
    peak_rss_bytes: int | None = None
    extra: dict = field(default_factory=dict)
    process: str = PROCESS_ID  # the process that trained the epoch (a pid repeats in containers)


class RunLog:
    """Appends epoch records to the files of a run directory (truncated on a fresh start); each
    record is fsynced, so the log is never behind the checkpoint written after it."""

    def __init__(self, run_dir: Path, resume: bool = False) -> None:
        self.metrics_path = run_dir / METRICS_FILE
        self.selection_path = run_dir / SELECTION_FILE
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            write_text(self.metrics_path, "")
            write_text(self.selection_path, "")

    def write(self, metrics: EpochMetrics, selection: Selection) -> None:
        append_line(self.metrics_path, json.dumps(asdict(metrics)))
        append_line(self.selection_path, json.dumps(selection.to_json()))

    def epochs_logged(self) -> int:
        """Complete records in both files (a line cut by a kill does not count)."""
        return min(len(_complete_lines(path)) for path in (self.metrics_path, self.selection_path))

    def truncate_to(self, epochs: int) -> None:
        """Keep the first ``epochs`` records (used on resume after a crash)."""
        for path in (self.metrics_path, self.selection_path):
            lines = _complete_lines(path)[:epochs]
            write_text(path, "".join(line + "\n" for line in lines))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _complete_lines(path: Path) -> list[str]:
    """The lines of ``path`` that are whole JSON records, up to the first that is not."""
    if not path.exists():
        return []
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            json.loads(line)
        except ValueError:
            break
        lines.append(line)
    return lines
