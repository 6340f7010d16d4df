"""Workstation fine-tuning: build the model and data, resolve the budget, pick candidate layers,
and run the training loop with the chosen engine."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.atomic import replace_folder, replacing, staging_sibling, write_json
from ..core.budget import Budget, cap_budget, parse_budget
from ..core.layers import BYTES_PER_UNIT, LayerCost, channel_costs, full_units
from ..core.selection import CandidateLayer, ChannelSampler, Selection, method_spec
from ..device.data import Dataset, epoch_order, load_dataset, validation_source
from ..device.loop import TrainConfig, fell_below, train
from ..device.memwatch import peak_rss_bytes
from ..device.progress import Progress
from ..device.rundir import DONE_FILE, SUMMARY_FILE, TRAINING_OUTPUTS, open_run_folder, run_finished
from ..device.runner import channel_sampler
from ..engines.torch_masked import TorchMaskedEngine
from ..errors import EdgeTradyError, RunFolderError
from .cost_trace import norm_pairs, trace_layers
from .models import BuiltModel, build_model, model_normalization
from .ranking import DEFAULT_K_RATIO, DEFAULT_THRESHOLD, K_RULES, Ranking, budget_top_k, build_ranking
from .rgn import LayerScores, channel_rgn

ENGINES = ("torch-masked", "torch-sparse", "ort", "portable")
RANKING_FILE = "ranking.json"
ARTIFACT_DIR = "artifact"  # the ort / portable engine's training artifact, inside the run folder
FINETUNE_OUTPUTS = TRAINING_OUTPUTS.with_files("model.pt", "model.onnx", RANKING_FILE).with_folder(
    ARTIFACT_DIR,
    r"^(layout\.json|training_model\.onnx|eval_model\.onnx|optimizer_model\.onnx|checkpoint"
    r"|portable\.json|train_step\.onnx|inference\.onnx)$",
)
SHIFT_SCOPES = ("none", "candidates", "all")


@dataclass
class FinetuneSpec:
    """Everything that defines a fine-tuning run (what ``finetune`` options and plans carry)."""

    model: str
    data: str
    image_size: int = 64
    per_class: int | None = None
    val_data: str | None = None
    val_per_class: int | None = None
    method: str = "trady"
    budget: str = "2%"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.125
    warmup_epochs: int | None = None
    seed: int = 0
    overflow: str = "skip"
    weighting: str = "uniform"  # channel draw: "uniform" (TraDy) or "gradnorm" (MeDyate)
    ranking: str | None = None  # path to ranking.json; computed when needed and absent
    rank_epochs: int = 1
    rank_lr: float = 0.01  # full fine-tuning for the ranking diverges at 0.125 (docs/reproduction.md)
    threshold: float = DEFAULT_THRESHOLD
    rank_score: str = "rgn"  # layer score of the ranking: "rgn" (TraDy) or "lara" (MeDyate)
    k_rule: str = "threshold"  # top-K: "threshold" share of the score, or "budget" (B_mem / M_K <= k_ratio)
    k_ratio: float = DEFAULT_K_RATIO
    train_shifts: str = "none"  # norm shifts trained too: "none", "candidates" (those of candidate layers), "all"
    top_k: list[str] | None = None  # explicit candidate layers (from a plan)
    engine: str = "torch-masked"
    score_batches: int = 4  # batches used to score channels for the RGN oracles
    checkpoint_every: int = 0
    trust_model_code: bool = False  # allow a model factory (Python code) as ``model``
    eval_every: int = 1  # validate every N epochs (and after the last)


@dataclass
class Prepared:
    """A spec turned into objects: model, layers, data, budget."""

    built: BuiltModel
    layers: list[LayerCost]
    train: Dataset
    val: Dataset
    budget: Budget  # resolved: units or bytes
    full_units: int

    @property
    def candidates(self) -> list[LayerCost]:
        return [layer for layer in self.layers if layer.name != self.built.classifier]


def prepare(spec: FinetuneSpec, progress: Progress | None = None) -> Prepared:
    budget = parse_budget(spec.budget)
    if method_spec(spec.method).rule in ("random", "rgn") and budget.amount <= 0:
        raise EdgeTradyError(
            f"budget {spec.budget!r} selects no channel: give a budget > 0, or --method classifier-only "
            "to train the classifier alone"
        )
    train_data = load_dataset(
        spec.data, "train", spec.image_size, model_normalization(spec.model), spec.per_class, spec.seed
    )
    val_spec, val_split = validation_source(spec.val_data, spec.data)
    val_per_class = spec.val_per_class if spec.val_per_class is not None else spec.per_class
    val_data = load_dataset(val_spec, val_split, spec.image_size, train_data.normalization, val_per_class, spec.seed)
    if val_data.num_classes != train_data.num_classes:
        raise EdgeTradyError(
            f"validation data has {val_data.num_classes} classes, training data {train_data.num_classes} ({val_spec})"
        )
    built = build_model(spec.model, train_data.num_classes, spec.image_size, spec.seed, spec.trust_model_code)
    layers = trace_layers(built.module, built.example)
    total = full_units(layers)
    budget, note = cap_budget(budget.resolve(total), layers, spec.batch_size)
    if note and progress is not None:
        progress.line(f"note: {note}")
    return Prepared(built, layers, train_data, val_data, budget, total)


def make_sampler(prep: Prepared, spec: FinetuneSpec, top_k: list[str] | None, reserved: float = 0.0) -> ChannelSampler:
    """The method's sampler; ``reserved`` (in the budget's unit) is taken off the channel budget."""
    budget = Budget(prep.budget.amount - reserved, prep.budget.unit)
    return channel_sampler(
        spec.method, prep.candidates, top_k, budget, spec.batch_size, spec.seed, spec.overflow, spec.weighting
    )


def shift_layers(prep: Prepared, spec: FinetuneSpec, candidates: list[str]) -> list[str]:
    """Normalization layers whose shift (bias) trains (``spec.train_shifts``): the BatchNorm after a
    conv and the LayerNorm before a Linear (``cost_trace.norm_pairs``) of the candidate layers, or of
    every layer but the classifier; each once."""
    if spec.train_shifts == "none":
        return []
    if spec.train_shifts not in SHIFT_SCOPES:
        raise EdgeTradyError(f"train_shifts must be one of {SHIFT_SCOPES}, got {spec.train_shifts!r}")
    pairs = norm_pairs(prep.built.module, prep.built.example)
    layers = candidates if spec.train_shifts == "candidates" else [layer.name for layer in prep.candidates]
    return list(dict.fromkeys(pairs[name] for name in layers if name in pairs))


def shift_cost(prep: Prepared, shifts: list[str]) -> float:
    """Budget the shifts take: one gradient value per channel (no stored activation), in the budget's unit."""
    values = sum(prep.built.module.get_submodule(name).bias.numel() for name in shifts)
    return float(values * (BYTES_PER_UNIT if prep.budget.unit == "bytes" else 1))


def choose_top_k(ranking: Ranking, prep: Prepared, spec: FinetuneSpec) -> list[str]:
    """The candidate layers of a top-K method: by ``spec.rank_score``, with ``spec.k_rule``."""
    ranking = ranking.rescored(spec.rank_score)
    if spec.k_rule == "threshold":
        return ranking.top_k(spec.threshold)
    if spec.k_rule != "budget":
        raise EdgeTradyError(f"unknown K rule {spec.k_rule!r}; choose from {', '.join(K_RULES)}")
    unit = prep.budget.unit
    cost = {c.name: channel_costs(c, unit, spec.batch_size) * c.in_channels for c in prep.candidates}
    return budget_top_k([layer.name for layer in ranking.layers], cost, prep.budget.amount, spec.k_ratio)


def compute_ranking(prep: Prepared, spec: FinetuneSpec, progress: Progress, score: str = "rgn") -> Ranking:
    """Fine-tune every layer with full gradients for ``spec.rank_epochs``; rank by RGN."""
    engine = TorchMaskedEngine(prep.built.module, prep.layers, prep.built.classifier)
    scores = LayerScores(prep.candidates)
    engine.grad_observer = scores.observe
    sampler = ChannelSampler(
        "full", [CandidateLayer(c.name, c.in_channels, 0.0) for c in prep.candidates], None, spec.seed
    )
    config = TrainConfig(spec.rank_epochs, spec.batch_size, spec.rank_lr, 0, spec.seed)
    initial = {k: v.clone() for k, v in prep.built.module.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        train(engine, sampler, prep.train, None, config, Path(tmp), progress)
    prep.built.module.load_state_dict(initial)  # ranking must not change the model we fine-tune
    source = {
        "data": spec.data,
        "per_class": spec.per_class,
        "epochs": spec.rank_epochs,
        "batch_size": spec.batch_size,
        "lr": spec.rank_lr,
        "seed": spec.seed,
    }
    return build_ranking(spec.model, spec.image_size, scores.rgn, scores.lara, spec.threshold, score, source)


def rgn_score_fn(engine: TorchMaskedEngine, prep: Prepared, sampler: ChannelSampler, spec: FinetuneSpec):
    """Per-channel RGN on a few batches with the current weights (the D/S-Det RGN oracle)."""
    by_name = {layer.name: layer for layer in prep.layers}
    every = {c.name: np.arange(c.channels) for c in sampler.layers}

    def score(epoch: int) -> dict[str, np.ndarray]:
        engine.set_selection(Selection(epoch, every, 0.0))
        totals = {name: torch.zeros(by_name[name].in_channels) for name in every}
        order = epoch_order(len(prep.train), spec.seed + 1, epoch)
        for i, (x, y) in enumerate(prep.train.batches(spec.batch_size, order)):
            if i >= spec.score_batches:
                break
            _, _, grads = engine.gradients(x, y)
            for name in every:
                totals[name] += channel_rgn(by_name[name], grads[name])
        return {name: t.numpy() for name, t in totals.items()}

    return score


def make_engine(prep: Prepared, spec: FinetuneSpec, out_dir: Path, trainable: list[str], shifts: list[str] = ()):
    batchnorm = method_spec(spec.method).batchnorm
    if spec.engine == "torch-masked":
        return TorchMaskedEngine(prep.built.module, prep.layers, prep.built.classifier, batchnorm, shifts)
    if batchnorm != "frozen":
        raise EdgeTradyError(
            f"method {spec.method!r} trains BatchNorm with batch statistics, which only the torch-masked "
            "engine does: use --engine torch-masked, or --method full-frozen-bn"
        )
    if spec.engine == "torch-sparse":
        from ..engines.torch_sparse import TorchSparseEngine

        return TorchSparseEngine(prep.built.module, prep.layers, prep.built.classifier, train_shifts=shifts)
    if shifts:
        raise EdgeTradyError("training BatchNorm shifts needs --engine torch-masked or torch-sparse")
    artifact = out_dir / ARTIFACT_DIR
    staging = staging_sibling(artifact)
    args = (prep.built.module, prep.layers, trainable, prep.built.classifier, spec.image_size, staging)
    if spec.engine == "ort":
        from ..engines.ort_training import OrtEngine
        from .export.ort_training import export_training_artifact

        return OrtEngine(artifact, _export_artifact(export_training_artifact, args, artifact))
    if spec.engine == "portable":
        from ..engines.portable import PortableEngine
        from .export.portable import export_portable_artifact

        return PortableEngine(artifact, _export_artifact(export_portable_artifact, args, artifact))
    raise EdgeTradyError(f"unknown engine {spec.engine!r}; choose from {', '.join(ENGINES)}")


def _export_artifact(export, args: tuple, artifact: Path):
    """Export the run's training artifact (``export(*args)``, into the staging folder that ends
    ``args``) and swap it in whole; refuses an ``artifact/`` holding files edge-trady did not
    write. Returns the exporter's layout."""
    staging = args[-1]
    owned = FINETUNE_OUTPUTS.folders[ARTIFACT_DIR]
    theirs = sorted(p.name for p in artifact.iterdir() if not owned.match(p.name)) if artifact.is_dir() else []
    if theirs:
        raise RunFolderError(f"{artifact}: holds files edge-trady did not write ({', '.join(theirs[:5])})")
    try:
        staging.mkdir(parents=True, exist_ok=True)
        layout = export(*args)
        replace_folder(staging, artifact)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return layout


def weights_digest(module: torch.nn.Module) -> str:
    """A short hash of a model's parameters and buffers (names, shapes and values)."""
    digest = hashlib.blake2b(digest_size=12)
    for name, tensor in module.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}{tuple(value.shape)}{value.dtype}".encode())
        digest.update(value.numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


@dataclass
class FinetuneResult:
    spec: dict
    full_units: int
    budget: str
    budget_amount: float
    budget_unit: str
    top_k: list[str] | None
    initial_val_acc: float | None
    final_val_acc: float | None
    final_train_loss: float
    peak_rss_bytes: int
    seconds: float
    accuracy_fell: bool = False  # final validation accuracy below the one before training
    shift_cost: float = 0.0  # budget taken by BatchNorm shifts (train_shifts), in budget_unit
    epochs: list[dict] = field(default_factory=list)


def run_finetune(
    spec: FinetuneSpec, out_dir: Path, progress: Progress, resume: bool = False, overwrite: bool = False
) -> FinetuneResult | None:
    """Fine-tune as ``spec`` says into the run folder ``out_dir`` (its rules: ``device.rundir``);
    None for ``resume`` on a finished run (nothing done, nothing changed)."""
    if resume and run_finished(out_dir):
        progress.line(f"{out_dir}: the run there has finished ({DONE_FILE}); nothing to do")
        return None
    started = time.monotonic()
    with open_run_folder(out_dir, FINETUNE_OUTPUTS, resume, overwrite, progress) as folder:
        if folder.finished:
            return None
        result = _finetune(spec, folder.path, progress, folder.resume, started)
        folder.finish("finetune")
    return result


def _finetune(spec: FinetuneSpec, out_dir: Path, progress: Progress, resume: bool, started: float) -> FinetuneResult:
    prep = prepare(spec, progress)
    initial_weights = weights_digest(prep.built.module)
    top_k = spec.top_k
    if top_k is None and method_spec(spec.method).pool == "topk":
        if spec.ranking:
            ranking = Ranking.load(Path(spec.ranking))
        elif resume and (out_dir / RANKING_FILE).is_file():
            ranking = Ranking.load(out_dir / RANKING_FILE)  # the run's own; checked by the origin
        else:
            progress.line(f"ranking layers ({spec.rank_epochs} epoch(s) of full fine-tuning)")
            ranking = compute_ranking(prep, spec, progress)
            ranking.save(out_dir / RANKING_FILE)
        top_k = choose_top_k(ranking, prep, spec)
    sampler = make_sampler(prep, spec, top_k)
    if sampler.needs_scores and spec.engine != "torch-masked":
        raise EdgeTradyError(f"method {spec.method!r} (an RGN oracle) needs --engine torch-masked")
    shifts = shift_layers(prep, spec, [layer.name for layer in sampler.layers])
    if shifts and sampler.budget is not None:  # the shifts' gradients are paid from the budget
        reserved = shift_cost(prep, shifts)
        if reserved > prep.budget.amount:
            raise EdgeTradyError(f"the BatchNorm shifts alone ({reserved:,.0f}) exceed the budget {prep.budget}")
        sampler = make_sampler(prep, spec, top_k, reserved)
    else:
        reserved = 0.0
    engine = make_engine(prep, spec, out_dir, [layer.name for layer in sampler.layers], shifts)
    progress.line(
        f"{spec.model} on {prep.train.source}: {len(prep.train)} train / {len(prep.val)} val images, "
        f"method {spec.method}, budget {prep.budget} ({len(sampler.layers)} candidate layers), "
        f"engine {spec.engine}"
    )
    config = TrainConfig(
        spec.epochs,
        spec.batch_size,
        spec.lr,
        spec.warmup_epochs,
        spec.seed,
        spec.checkpoint_every,
        prep.budget.unit,
        spec.eval_every,
    )
    score_fn = rgn_score_fn(engine, prep, sampler, spec) if sampler.needs_scores else None
    origin = {
        "model": spec.model,
        "image_size": spec.image_size,
        "initial_weights": initial_weights,
        "train_shifts": shifts,
    }
    result = train(engine, sampler, prep.train, prep.val, config, out_dir, progress, score_fn, resume, origin)
    if spec.engine in ("ort", "portable"):
        with replacing(out_dir / "model.onnx") as tmp:
            engine.export_inference(tmp)
    else:
        with replacing(out_dir / "model.pt") as tmp:
            torch.save(prep.built.module.state_dict(), tmp)
    epochs = result.epochs
    summary = FinetuneResult(
        spec=asdict(spec),
        full_units=prep.full_units,
        budget=spec.budget,
        budget_amount=prep.budget.amount,
        budget_unit=prep.budget.unit,
        top_k=top_k,
        initial_val_acc=result.initial_val_acc,
        final_val_acc=epochs[-1]["val_acc"],
        final_train_loss=epochs[-1]["train_loss"],
        peak_rss_bytes=peak_rss_bytes(),
        seconds=time.monotonic() - started,
        accuracy_fell=fell_below(result.initial_val_acc, epochs[-1]["val_acc"]),
        shift_cost=reserved,
        epochs=epochs,
    )
    write_json(out_dir / SUMMARY_FILE, asdict(summary), indent=2)
    return summary
