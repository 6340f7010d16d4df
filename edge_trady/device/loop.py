"""The engine-agnostic training loop: sample channels each epoch, train, evaluate, log,
checkpoint. No torch here: the device runner uses it with the ONNX Runtime engine."""

from __future__ import annotations

import hashlib
import json
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
from ..errors import Diverged, EdgeTradyError, Stopped
from .checkpoint import (
    CorruptCheckpoint,
    LoopState,
    has_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from .data import Dataset, epoch_order
from .heartbeat import FINISHED, TRAINING, Heartbeat
from .memwatch import peak_rss_bytes, release_free_memory
from .progress import Progress
from .runlog import EpochMetrics, RunLog, read_jsonl

ScoreFn = Callable[[int], dict[str, np.ndarray]]
__all__ = ["Stopped", "TrainConfig", "TrainResult", "evaluate", "train"]


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
        if self.epochs < 1 or self.batch_size < 1 or self.eval_every < 1:
            raise EdgeTradyError(
                f"epochs ({self.epochs}), batch size ({self.batch_size}) and eval interval ({self.eval_every}) "
                "must be >= 1"
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise EdgeTradyError(f"the learning rate must be a finite number > 0, got {self.lr!r}")
        if self.seed < 0 or (self.warmup_epochs is not None and self.warmup_epochs < 0):
            raise EdgeTradyError(f"seed ({self.seed}) and warm-up epochs ({self.warmup_epochs}) must be >= 0")


@dataclass
class TrainResult:
    """Every epoch's metrics (as logged) and the validation figures before any training (of the
    run's start: a resumed run reports those its checkpoint carries)."""

    epochs: list[dict]
    initial_val_loss: float | None
    initial_val_acc: float | None
    resumed: bool


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


def run_origin(
    config: TrainConfig,
    steps_per_epoch: int,
    warmup_steps: int,
    sampler: ChannelSampler,
    engine: Engine,
    train_data: Dataset,
    val_data: Dataset | None,
) -> dict:
    """What a checkpoint must share with the run resuming it (besides what the caller adds)."""
    layers = json.dumps([[c.name, c.channels, c.cost] for c in sampler.layers]).encode()
    return {  # in the order a mismatch is reported: the first difference is named
        "train_data": train_data.fingerprint(),
        "val_data": val_data and val_data.fingerprint(),
        "engine": engine.name,
        "method": sampler.method,
        "budget": sampler.budget,
        "budget_unit": config.budget_unit,
        "overflow": sampler.overflow,
        "weighting": sampler.weighting,
        "candidate_layers": f"{len(sampler.layers)} layers, sha256 {hashlib.sha256(layers).hexdigest()[:16]}",
        "seed": config.seed,
        "batch_size": config.batch_size,
        "epochs": config.epochs,
        "steps_per_epoch": steps_per_epoch,
        "lr": config.lr,
        "warmup_steps": warmup_steps,
    }


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
    origin: dict | None = None,
) -> TrainResult:
    """Train for ``config.epochs`` (continuing from the newest checkpoint with ``resume``).

    ``origin``: what identifies the run besides the loop's own settings (artifact hash, model);
    a checkpoint whose origin differs is refused. A non-finite loss or weight raises Diverged
    before anything non-finite is saved. An epoch that ends below the validation accuracy before
    training is flagged in the progress."""
    steps_per_epoch = math.ceil(len(train_data) / config.batch_size)
    schedule = make_schedule(config.lr, config.epochs, steps_per_epoch, config.warmup_epochs)
    origin = {
        **(origin or {}),
        **run_origin(config, steps_per_epoch, schedule.warmup_steps, sampler, engine, train_data, val_data),
    }
    resume = resume and has_checkpoint(run_dir)  # nothing saved yet: a fresh start
    log = RunLog(run_dir, resume=resume)
    if resume:
        check = _state_check(config, steps_per_epoch, len(train_data), sampler, log)
        state = load_checkpoint(run_dir, engine, origin, check, progress)
        release_free_memory()  # what loading freed must not stay resident under the run's peak
        sampler.load_state(state.sampler)
        log.truncate_to(state.epoch)
        progress.line(f"resuming at epoch {state.epoch + 1}, step {state.step_in_epoch}")
    else:
        state = LoopState()
        if val_data is not None:
            state.initial_val_loss, state.initial_val_acc = evaluate(engine, val_data, config.batch_size)
            progress.line(f"val_acc before training {state.initial_val_acc:.4f}")
    initial = (state.initial_val_loss, state.initial_val_acc)

    def checkpoint(where: str) -> None:
        _require_finite_weights(engine, run_dir, where)
        save_checkpoint(run_dir, engine, state, origin)

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
            lr = schedule.lr(epoch * steps_per_epoch)
            where = f"epoch {epoch + 1}/{config.epochs}"
            x = None  # the batch buffer, filled again each step (the engines keep no reference to it)
            for step, indices in _remaining(order, config.batch_size, state.step_in_epoch):
                x, y = train_data.batch(indices, out=x)
                lr = schedule.lr(epoch * steps_per_epoch + step)
                loss, correct = engine.train_step(x, y, lr)
                if not math.isfinite(loss):
                    raise _diverged(run_dir, f"{where}, step {step + 1}: loss {loss} at learning rate {lr:.4g}")
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
                    checkpoint(f"{where}, step {step + 1}")
                    if stop_requested():
                        raise Stopped(f"stopped by signal; resume with --resume ({run_dir})")
            if sampler.needs_grad_norms and state.grad_norm_sums:
                means = {k: np.asarray(v) / max(1, state.step_in_epoch) for k, v in state.grad_norm_sums.items()}
                sampler.observe(selection, means)  # before the checkpoint below records the sampler
            due = (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs
            val_loss, val_acc = evaluate(engine, val_data, config.batch_size) if val_data and due else (None, None)
            if val_loss is not None and not math.isfinite(val_loss):
                raise _diverged(run_dir, f"{where}: validation loss {val_loss}")
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
            _require_finite_weights(engine, run_dir, where)
            log.write(metrics, selection)  # fsynced: never behind the checkpoint that follows
            progress.line(_summary(metrics, config.epochs))
            if fell_below(initial[1], val_acc):
                progress.line(f"warning: {accuracy_fell_message(initial[1], val_acc)}")
            state = LoopState(epoch + 1, sampler=sampler.state())
            state.initial_val_loss, state.initial_val_acc = initial
            save_checkpoint(run_dir, engine, state, origin)
            heartbeat.beat(FINISHED if epoch + 1 == config.epochs else TRAINING, epoch + 1, 0)
    return TrainResult(read_jsonl(log.metrics_path), *initial, resume)


def _remaining(order: np.ndarray, batch_size: int, start: int) -> Iterator[tuple[int, np.ndarray]]:
    """(step, indices) of the batches of an epoch from step ``start`` on (earlier ones not built)."""
    for step, first in enumerate(range(0, len(order), batch_size)):
        if step >= start:
            yield step, order[first : first + batch_size]


def _state_check(
    config: TrainConfig, steps_per_epoch: int, images: int, sampler: ChannelSampler, log: RunLog
) -> Callable[[LoopState], None]:
    """Raise CorruptCheckpoint for a loop state this run could not have written."""

    def check(state: LoopState) -> None:
        problems = []
        if state.epoch > config.epochs or (state.epoch == config.epochs and state.step_in_epoch):
            problems.append(f"epoch {state.epoch} (step {state.step_in_epoch}) is past the run's {config.epochs}")
        if state.step_in_epoch > steps_per_epoch:
            problems.append(f"step {state.step_in_epoch} is past the epoch's {steps_per_epoch}")
        if state.seen != min(state.step_in_epoch * config.batch_size, images) or state.correct > state.seen:
            problems.append(f"{state.seen} images seen / {state.correct} correct at step {state.step_in_epoch}")
        if state.initial_val_acc is not None and state.initial_val_acc > 1:
            problems.append(f"initial accuracy {state.initial_val_acc}")
        if state.step_in_epoch and state.selection is None:
            problems.append("no selection for a mid-epoch state")
        logged = log.epochs_logged()
        if logged < state.epoch:
            problems.append(f"{log.metrics_path.name} holds {logged} epochs, the checkpoint is at epoch {state.epoch}")
        static = state.sampler.get("static") if isinstance(state.sampler, dict) else None
        for what, data in (("selection", state.selection), ("sampler", static)):
            if data is not None and (problem := _selection_problem(data, sampler)):
                problems.append(f"{what}: {problem}")
        if state.sampler is not None and (problem := _sampler_problem(state.sampler, sampler)):
            problems.append(f"sampler: {problem}")
        if state.grad_norm_sums is not None and (problem := _norm_sums_problem(state.grad_norm_sums, state.selection)):
            problems.append(f"grad_norm_sums: {problem}")
        if problems:
            raise CorruptCheckpoint(f"checkpoint state out of range for this run: {'; '.join(problems)}")

    return check


def _selection_problem(data: dict, sampler: ChannelSampler) -> str | None:
    """What is wrong with a selection read from a checkpoint (None: nothing)."""
    sizes = {layer.name: layer.channels for layer in sampler.layers}
    if set(data) != {"epoch", "cost", "channels"} or not isinstance(data["channels"], dict):
        return "expected epoch, cost and channels"
    cost = data["cost"]
    if not isinstance(cost, int | float) or not math.isfinite(cost) or cost < 0:
        return f"cost {cost!r}"
    if sampler.budget is not None and cost > sampler.budget * (1 + 1e-9) + 1e-6:
        return f"cost {cost} exceeds the budget {sampler.budget}"
    for name, channels in data["channels"].items():
        if name not in sizes:
            return f"layer {name!r} is not a candidate"
        ints = isinstance(channels, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in channels)
        in_range = ints and (not channels or (channels[0] >= 0 and channels[-1] < sizes[name]))
        if not in_range or channels != sorted(set(channels)):
            return f"channels of {name!r} must be distinct sorted indices in [0, {sizes[name]})"
    return None


def _sampler_problem(data: dict, sampler: ChannelSampler) -> str | None:
    """What is wrong with a sampler state (``ChannelSampler.state``) read from a checkpoint."""
    if not set(data) <= {"static", "grad_norms"}:
        return f"unknown sections {sorted(set(data) - {'static', 'grad_norms'})}"
    norms = data.get("grad_norms")
    pooled = sum(layer.channels for layer in sampler.layers)
    if norms is not None and not (isinstance(norms, list) and len(norms) == pooled and all(map(_norm, norms))):
        return f"grad_norms must be {pooled} finite numbers >= 0 (or null)"
    return None


def _norm_sums_problem(data: dict, selection: dict | None) -> str | None:
    """What is wrong with an epoch's running gradient-norm sums (one per selected channel of each
    layer of the epoch's selection) read from a checkpoint."""
    channels = selection.get("channels") if isinstance(selection, dict) else None
    if not isinstance(channels, dict):
        return "no selection to go with them"
    for name, sums in data.items():
        if not isinstance(sums, list) or not isinstance(channels.get(name), list) or len(sums) != len(channels[name]):
            return f"layer {name!r}: expected one sum per selected channel"
        if not all(v is not None and _norm(v) for v in sums):
            return f"layer {name!r}: sums must be finite numbers >= 0"
    return None


def _norm(value: object) -> bool:
    """A gradient norm as a checkpoint holds it: None (never seen) or a finite number >= 0."""
    if value is None:
        return True
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _require_finite_weights(engine: Engine, run_dir: Path, where: str) -> None:
    if not engine.weights_finite():
        raise _diverged(run_dir, f"{where}: non-finite weights")


def _diverged(run_dir: Path, what: str) -> Diverged:
    last = latest_checkpoint(run_dir)
    kept = f"the last good checkpoint {last} is kept" if last else "no checkpoint had been written"
    return Diverged(
        f"training diverged at {what}; nothing non-finite was saved ({kept}); "
        "lower the learning rate (plan --lr, finetune --lr) and start again"
    )


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
