"""The server's run folder: what a restarted server continues from.

    fleet.json         what defines the run (artifact hash, rounds, local epochs, aggregation): a restart must match
    global/round-NNNN.npz   the global trainable state after round N (0: the artifact's), atomic
    rounds.jsonl       one line per finished round (0: the initial evaluation), appended after its npz
    status.json        running / finished / failed (+ error), for the operator and the CLI
    model.onnx, model.json, summary.json   the final global model, when every round is done

A round counts as done when its line is in ``rounds.jsonl`` and its state file exists; a server
killed in between redoes that round (the nodes' selections are seeded by round: same draw).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..core.atomic import append_line, replacing, write_json, write_text
from ..errors import FleetError
from .aggregate import UPDATERS

RUN_FILE = "fleet.json"
ROUNDS_LOG = "rounds.jsonl"
STATUS_FILE = "status.json"
GLOBAL_DIR = "global"
MODEL_FILE = "model.onnx"
SUMMARY_FILE = "summary.json"
FLOWER_DIR = "flower"  # the CLI's Flower files (app, config, logs): not part of the run's state


@dataclass(frozen=True)
class FleetRun:
    """``fleet.json``."""

    artifact_sha256: str
    model: str
    rounds: int
    local_epochs: int
    aggregation: str = UPDATERS  # the default (a run folder written before the option has none)


class RunFolder:
    def __init__(self, out: Path) -> None:
        self.out = Path(out)

    def begin(self, run: FleetRun, initial: dict[str, np.ndarray]) -> int:
        """Check ``out`` for ``run`` and return the last finished round (0 for a new run, whose
        initial state is saved here)."""
        last = self.check(run)
        if last is None:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / GLOBAL_DIR).mkdir(exist_ok=True)
            write_json(self.out / RUN_FILE, asdict(run))
            self.save_state(0, initial)
            return 0
        self._drop_cut_line()
        return last

    def check(self, run: FleetRun) -> int | None:
        """The last finished round of ``run`` in ``out``; None if ``out`` holds no run yet. Raises
        FleetError for another run's folder or a finished one (a finished run is final)."""
        path = self.out / RUN_FILE
        if not path.is_file():
            extra = sorted(p.name for p in self.out.iterdir() if p.name != FLOWER_DIR) if self.out.is_dir() else []
            if extra:
                raise FleetError(f"{self.out}: not empty and not a fleet run folder ({', '.join(extra[:3])}...)")
            return None
        try:
            saved = FleetRun(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise FleetError(f"{path}: unreadable ({exc})") from exc
        if saved != run:
            diff = [f"{k} {v!r} (now {getattr(run, k)!r})" for k, v in asdict(saved).items() if getattr(run, k) != v]
            raise FleetError(f"{self.out} holds another fleet run: {', '.join(diff)}; give another --out")
        last = self.last_round()
        if last >= run.rounds:
            raise FleetError(
                f"{self.out}: all {run.rounds} rounds are done; a finished run is final, give another --out"
            )
        return last

    def last_round(self) -> int:
        """The last round with both its log line and its state file (0 if only the start is saved)."""
        done = [record["round"] for record in self.records()]
        while done and not self.state_path(done[-1]).is_file():
            done.pop()
        return done[-1] if done else 0

    def records(self) -> list[dict]:
        path = self.out / ROUNDS_LOG
        if not path.is_file():
            return []
        lines = path.read_text().splitlines()
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except ValueError:  # a line cut by a kill: the round is redone
                break
        return records

    def _drop_cut_line(self) -> None:
        """Rewrite ``rounds.jsonl`` without a last line a kill cut short (appends stay whole lines)."""
        path = self.out / ROUNDS_LOG
        if path.is_file() and not path.read_text().endswith("\n") and path.stat().st_size:
            write_text(path, "".join(json.dumps(record) + "\n" for record in self.records()))

    def state_path(self, round_number: int) -> Path:
        return self.out / GLOBAL_DIR / f"round-{round_number:04d}.npz"

    def save_state(self, round_number: int, state: dict[str, np.ndarray]) -> None:
        with replacing(self.state_path(round_number)) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **state)

    def load_state(self, round_number: int, expected: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The saved global state of a round, checked against the artifact's tensors."""
        path = self.state_path(round_number)
        try:
            with np.load(path) as saved:
                state = {name: saved[name] for name in saved.files}
        except (OSError, ValueError) as exc:
            raise FleetError(f"{path}: unreadable ({exc})") from exc
        if {k: (v.shape, v.dtype) for k, v in state.items()} != {k: (v.shape, v.dtype) for k, v in expected.items()}:
            raise FleetError(f"{path}: its tensors are not the artifact's")
        return state

    def log_round(self, record: dict) -> None:
        append_line(self.out / ROUNDS_LOG, json.dumps(record))

    def set_status(self, state: str, **fields) -> None:
        write_json(self.out / STATUS_FILE, {"state": state, **fields})

    def status(self) -> dict:
        try:
            return json.loads((self.out / STATUS_FILE).read_text())
        except (OSError, ValueError):
            return {}
