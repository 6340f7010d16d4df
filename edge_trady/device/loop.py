"""The engine-agnostic training loop: sample channels each epoch, train, evaluate, log,
checkpoint. No torch here: the device runner uses it with the ONNX Runtime engine."""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.schedule import make_schedule
from ..core.selection import ChannelSampler, Selection
from ..engines.base import Engine
from ..errors import EdgeTradyError
from .checkpoint import LoopState, has_checkpoint, load_checkpoint, save_checkpoint
from .data import Dataset, epoch_order
from .heartbeat import FINISHED, TRAINING, Heartbeat
from .memwatch import peak_rss_bytes
from .progress import Progress
from .runlog import EpochMetrics, RunLog, read_jsonl

ScoreFn = Callable[[int], dict[str, np.ndarray]]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    batch_size: int = 32
    lr: float = 0.125
    warmup_epochs: int | None = None  # None: schedule.default_warmup_epochs
    seed: int = 0
    checkpoint_every: int = 0  # also checkpoint every N steps (0: only at epoch ends)
    budget_unit: str = "units"  # unit of the sampler's budget and costs: "units" or "bytes"
    eval_every: int = 1  # validate every N epochs (and always after the last)
    heartbeat_every: int = 10  # heartbeat.json every N steps (0: at epoch ends only)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.eval_every < 1:
            raise EdgeTradyError("epochs, batch size and eval interval must be >= 1 and the learning rate > 0")


class Stopped(EdgeTradyError):
    """Training stopped by a signal after saving a checkpoint."""

    exit_code = 130


def evaluate(engine: Engine, data: Dataset, batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``engine`` on ``data``."""
    loss_sum, correct = 0.0, 0
    for x, y in data.batches(batch_size, np.arange(len(data))):
        logits = engine.predict(x).astype(np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        loss_sum += float(-log_probs[np.arange(len(y)), y].sum())
        correct += int((logits.argmax(axis=1) == y).sum())
    return loss_sum / len(data), correct / len(data)


def train(
    engine: Engine,
    sampler: ChannelSampler,
    train_data: Dataset,
    val_data: Dataset | None,
    config: TrainConfig,
    run_dir: Path,
    progress: Progress,
    score_fn: ScoreFn | None = None,
    resume: bool = False,
    start_acc: float | None = None,
) -> list[dict]:
    """Train for ``config.epochs``; returns every epoch's metrics (as logged). ``start_acc``: the
    validation accuracy before training; an epoch that ends below it is flagged in the progress."""
    steps_per_epoch = math.ceil(len(train_data) / config.batch_size)
    schedule = make_schedule(config.lr, config.epochs, steps_per_epoch, config.warmup_epochs)
    resume = resume and has_checkpoint(run_dir)  # nothing saved yet: a fresh start
    log = RunLog(run_dir, resume=resume)
    state = LoopState()
    if resume:
        state = load_checkpoint(run_dir, engine)
        sampler.load_state(state.sampler)
        log.truncate_to(state.epoch)
        progress.line(f"resuming at epoch {state.epoch + 1}, step {state.step_in_epoch}")
    if sampler.needs_grad_norms:
        if not hasattr(engine, "record_grad_norms"):
            raise EdgeTradyError(
                f"gradient-norm weighted sampling needs an engine that reports per-channel gradient norms "
                f"(torch-masked, torch-sparse); {engine.name} does not"
            )
        engine.record_grad_norms = True
    progress.start(config.epochs, steps_per_epoch, len(train_data), state.epoch, state.step_in_epoch, state.seen)
    heartbeat = Heartbeat(run_dir, config.heartbeat_every, config.epochs, steps_per_epoch)
    if state.epoch < config.epochs:  # a finished run's folder is left as it is
        heartbeat.beat(TRAINING, state.epoch, state.step_in_epoch)
    with _stop_on_signals() as stop_requested, heartbeat.on_error(stopped=Stopped):
        for epoch in range(state.epoch, config.epochs):
            selection = _epoch_selection(sampler, state, epoch, score_fn)
            engine.set_selection(selection)
            started = time.monotonic() - state.elapsed_s
            order = epoch_order(len(train_data), config.seed, epoch)
            batches = train_data.batches(config.batch_size, order)
            lr = schedule.lr(epoch * steps_per_epoch)
            for step, (x, y) in _skip(batches, state.step_in_epoch):
                lr = schedule.lr(epoch * steps_per_epoch + step)
                loss, correct = engine.train_step(x, y, lr)
                state.loss_sum += loss * len(y)
                state.correct += correct
                state.seen += len(y)
                state.step_in_epoch = step + 1
                if sampler.needs_grad_norms:
                    state.grad_norm_sums = _add_norms(state.grad_norm_sums, engine.channel_grad_norms())
                progress.step(epoch, step + 1, state.seen, loss)
                heartbeat.step(epoch, step + 1)
                every = config.checkpoint_every
                if stop_requested() or (every and (step + 1) % every == 0 and step + 1 < steps_per_epoch):
                    state.elapsed_s = time.monotonic() - started
                    save_checkpoint(run_dir, engine, state)
                    if stop_requested():
                        raise Stopped(f"stopped by signal; resume with --resume ({run_dir})")
            if sampler.needs_grad_norms and state.grad_norm_sums:
                means = {k: np.asarray(v) / max(1, state.step_in_epoch) for k, v in state.grad_norm_sums.items()}
                sampler.observe(selection, means)  # before the checkpoint below records the sampler
            due = (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs
            val_loss, val_acc = evaluate(engine, val_data, config.batch_size) if val_data and due else (None, None)
            metrics = EpochMetrics(
                epoch=epoch + 1,
                train_loss=state.loss_sum / max(1, state.seen),
                train_acc=state.correct / max(1, state.seen),
                val_loss=val_loss,
                val_acc=val_acc,
                lr=lr,
                time_s=time.monotonic() - started,
                images=state.seen,
                units_used=selection.cost,
                budget_units=sampler.budget,
                budget_unit=config.budget_unit,
                channels_selected=selection.channel_count,
                channels_per_layer=selection.counts(),
                engine=engine.name,
                peak_rss_bytes=peak_rss_bytes(),
            )
            log.write(metrics, selection)
            progress.line(_summary(metrics, config.epochs))
            if fell_below(start_acc, val_acc):
                progress.line(f"warning: {accuracy_fell_message(start_acc, val_acc)}")
            state = LoopState(epoch=epoch + 1, sampler=sampler.state())
            save_checkpoint(run_dir, engine, state)
            heartbeat.beat(FINISHED if epoch + 1 == config.epochs else TRAINING, epoch + 1, 0)
    return read_jsonl(log.metrics_path)


def _add_norms(sums: dict | None, norms: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """Running per-channel sums of a step's gradient norms (JSON-ready: they go into checkpoints)."""
    sums = sums or {}
    return {k: (np.asarray(sums[k]) + v if k in sums else v).tolist() for k, v in norms.items()}


def fell_below(start_acc: float | None, val_acc: float | None) -> bool:
    """True when a validation accuracy ended below the accuracy before training."""
    return start_acc is not None and val_acc is not None and val_acc < start_acc


def accuracy_fell_message(start_acc: float, val_acc: float) -> str:
    return (
        f"validation accuracy fell below its starting point ({start_acc:.4f} -> {val_acc:.4f}): training "
        "made the model worse; try a lower learning rate (--lr) or a smaller budget"
    )


def _epoch_selection(sampler: ChannelSampler, state: LoopState, epoch: int, score_fn: ScoreFn | None) -> Selection:
    if state.selection is not None and state.step_in_epoch > 0:
        return Selection.from_json(state.selection)
    scores = score_fn(epoch) if sampler.needs_scores and score_fn is not None else None
    if sampler.needs_scores and scores is None and (sampler.dynamic or sampler.state() is None):
        raise EdgeTradyError(f"method {sampler.method!r} needs gradient scores this engine cannot give")
    selection = sampler.select(epoch, scores)
    state.selection = selection.to_json()
    state.sampler = sampler.state()
    return selection


def _skip(batches: Iterator, start: int) -> Iterator[tuple[int, tuple[np.ndarray, np.ndarray]]]:
    for step, batch in enumerate(batches):
        if step >= start:
            yield step, batch


def _summary(m: EpochMetrics, epochs: int) -> str:
    val = f" val_acc {m.val_acc:.4f}" if m.val_acc is not None else ""
    return (
        f"epoch {m.epoch}/{epochs} loss {m.train_loss:.4f} train_acc {m.train_acc:.4f}{val} "
        f"lr {m.lr:.4g} channels {m.channels_selected} cost {m.units_used:,.0f} "
        f"{m.time_s:.1f}s"
    )


@contextmanager
def _stop_on_signals() -> Iterator[Callable[[], bool]]:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint and stops at the next step."""
    requested = {"stop": False}

    def handler(signum: int, frame: object) -> None:
        requested["stop"] = True

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for sig in previous:
            signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        previous = {}
    try:
        yield lambda: requested["stop"]
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
