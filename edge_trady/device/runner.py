"""The device runner (no torch): verify a training artifact, check memory and data against it,
fine-tune it with the ONNX Runtime engine and the shared training loop, export the result."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..core.atomic import replacing, write_json
from ..core.budget import Budget, format_bytes
from ..core.layers import LayerCost, channel_costs
from ..core.plan import Plan
from ..core.selection import CandidateLayer, ChannelSampler, candidate_names, method_spec
from ..errors import ArtifactError, DataError, MemoryGuardError, PlanError
from .data import Dataset, Normalization, load_dataset, validation_source
from .loop import TrainConfig, evaluate, fell_below, train
from .manifest import Manifest, ModelInfo
from .memwatch import current_rss_bytes, peak_rss_bytes
from .profile import available_memory_bytes
from .progress import Progress

MODEL_FILE = "model.onnx"
SUMMARY_FILE = "summary.json"


def channel_sampler(
    method: str,
    candidates: Sequence[LayerCost],
    top_k: list[str] | None,
    budget: Budget,
    batch_size: int,
    seed: int,
    overflow: str,
    weighting: str = "uniform",
) -> ChannelSampler:
    """The sampler of ``method`` over ``candidates``, each channel costed in the budget's unit."""
    by_name = {layer.name: layer for layer in candidates}
    names = candidate_names(method, list(by_name), top_k)
    pool = [
        CandidateLayer(n, by_name[n].in_channels, channel_costs(by_name[n], budget.unit, batch_size)) for n in names
    ]
    return ChannelSampler(method, pool, budget.amount, seed, overflow, weighting)


def plan_sampler(plan: Plan) -> ChannelSampler:
    """The sampler a plan describes; refuses the RGN oracles, which need full gradients."""
    if method_spec(plan.method).rule == "rgn":
        raise PlanError(
            f"method {plan.method!r} is an RGN oracle: it scores channels with full gradients, which "
            "the device runner does not compute; plan another method (e.g. trady) or use "
            "'edge-trady finetune --engine torch-masked'"
        )
    if method_spec(plan.method).batchnorm != "frozen":
        raise PlanError(
            f"method {plan.method!r} trains BatchNorm with batch statistics, which the device engines do "
            "not do; plan --method full-frozen-bn (or a budgeted method)"
        )
    layers = plan.layer_costs
    names = [layer.name for layer in layers]
    budget = Budget(plan.budget, plan.budget_unit)
    return channel_sampler(plan.method, layers, names, budget, plan.batch_size, plan.seed, plan.overflow)


def check_memory(predicted_peak: int, force: bool, progress: Progress) -> None:
    """Refuse (MemoryGuardError) when the predicted whole-process peak exceeds what this process
    can have: what it already uses plus what is available. ``force`` warns instead."""
    usable = current_rss_bytes() + available_memory_bytes()
    if predicted_peak <= usable:
        return
    problem = (
        f"the plan's predicted peak {format_bytes(predicted_peak)} exceeds the memory available to "
        f"this run, {format_bytes(usable)}"
    )
    if not force:
        raise MemoryGuardError(
            f"{problem}: free memory, raise the memory limit or re-plan for this device "
            "(--force runs anyway and may be killed)"
        )
    progress.line(f"warning: {problem}; running anyway (--force)")


def check_data(data: Dataset, num_classes: int, class_names: list[str] | None, image_size: int) -> None:
    """Raise DataError unless ``data`` has the model's classes and input size."""
    if data.num_classes != num_classes:
        names = f" ({', '.join(class_names)})" if class_names else ""
        raise DataError(f"{data.source}: {data.num_classes} classes, the model has {num_classes}{names}")
    pair = [data.class_names, class_names]
    if all(names and not _numbered(names) for names in pair) and pair[0] != pair[1]:
        theirs, ours = next((a, b) for a, b in zip(*pair, strict=True) if a != b)
        raise DataError(f"{data.source}: class {theirs!r} where the model has {ours!r}")
    expected = (image_size, image_size, 3)
    if data.pixels.shape[1:] != expected:
        raise DataError(f"{data.source}: images of shape {data.pixels.shape[1:]}, the model takes {expected}")


def _numbered(names: list[str]) -> bool:
    """Placeholder names ('0', '1', ...) of data without class names."""
    return names == [str(i) for i in range(len(names))]


@dataclass
class RunRequest:
    """What ``edge-trady run`` was asked to do."""

    artifact: Path
    train: str
    out: Path
    val: str | None = None  # default: the validation split of ``train`` (data.validation_source)
    per_class: int | None = None
    val_per_class: int | None = None  # default: ``per_class``
    epochs: int | None = None  # default: the plan's
    resume: bool = False
    force: bool = False  # run even if the memory guard says it will not fit
    checkpoint_every: int = 0


@dataclass
class RunSummary:
    """``summary.json`` of a device run."""

    artifact_sha256: str
    model: str
    method: str
    epochs: int
    train_images: int
    val_images: int
    initial_val_acc: float  # before training (or at the resumed checkpoint)
    final_train_loss: float
    final_train_acc: float
    final_val_loss: float
    final_val_acc: float
    predicted_peak_bytes: int
    peak_rss_bytes: int
    seconds: float
    accuracy_fell: bool = False  # final validation accuracy below the one before training


def load_data(manifest: Manifest, request: RunRequest) -> tuple[Dataset, Dataset]:
    plan = manifest.plan
    norm = Normalization.from_dict(manifest.normalization)
    train_data = load_dataset(request.train, "train", plan.image_size, norm, request.per_class, plan.seed)
    val_per_class = request.per_class if request.val_per_class is None else request.val_per_class
    val_spec, val_split = validation_source(request.val, request.train)
    val_data = load_dataset(val_spec, val_split, plan.image_size, norm, val_per_class, plan.seed)
    for data in (train_data, val_data):
        check_data(data, plan.num_classes, manifest.class_names, plan.image_size)
    return train_data, val_data


def open_engine(manifest: Manifest, artifact: Path):
    """The engine of the artifact's format (it loads onnxruntime: only when a run really starts),
    checked against the plan the manifest carries."""
    if manifest.format == "onnx":
        from ..engines.portable import PortableEngine

        engine = PortableEngine(artifact)
    else:
        from ..engines.ort_training import OrtEngine

        engine = OrtEngine(artifact)
    for layer in manifest.plan.layer_costs:
        if engine.layers.get(layer.name) != layer:
            raise ArtifactError(
                f"{artifact}: the plan in its manifest does not match its graph (layer {layer.name!r}): export it again"
            )
    return engine


def run(request: RunRequest, progress: Progress) -> RunSummary:
    """Fine-tune the artifact on the device; writes the run folder and returns its summary."""
    started = time.monotonic()
    manifest = Manifest.load(request.artifact)
    plan = manifest.plan
    sampler = plan_sampler(plan)
    check_memory(plan.estimate.peak_bytes, request.force, progress)
    progress.predicted_peak_bytes = plan.estimate.peak_bytes
    train_data, val_data = load_data(manifest, request)
    engine = open_engine(manifest, request.artifact)
    config = TrainConfig(
        request.epochs or plan.epochs,
        plan.batch_size,
        plan.lr,
        plan.warmup_epochs,
        plan.seed,
        request.checkpoint_every,
        plan.budget_unit,
    )
    progress.line(
        f"{plan.model} on {train_data.source}: {len(train_data)} train / {len(val_data)} val images, "
        f"method {plan.method}, budget {Budget(plan.budget, plan.budget_unit)} "
        f"({len(sampler.layers)} candidate layers), predicted peak {format_bytes(plan.estimate.peak_bytes)}"
    )
    _, initial_val_acc = evaluate(engine, val_data, plan.batch_size)
    epochs = train(
        engine, sampler, train_data, val_data, config, request.out, progress, None, request.resume, initial_val_acc
    )
    model = request.out / MODEL_FILE
    with replacing(model) as tmp:
        engine.export_inference(tmp)
    ModelInfo.of(manifest).save(model)
    last = epochs[-1]
    summary = RunSummary(
        artifact_sha256=manifest.artifact_sha256,
        model=plan.model,
        method=plan.method,
        epochs=len(epochs),
        train_images=len(train_data),
        val_images=len(val_data),
        initial_val_acc=initial_val_acc,
        final_train_loss=last["train_loss"],
        final_train_acc=last["train_acc"],
        final_val_loss=last["val_loss"],
        final_val_acc=last["val_acc"],
        predicted_peak_bytes=plan.estimate.peak_bytes,
        peak_rss_bytes=peak_rss_bytes(),
        seconds=time.monotonic() - started,
        accuracy_fell=fell_below(initial_val_acc, last["val_acc"]),
    )
    write_json(request.out / SUMMARY_FILE, asdict(summary), indent=2)
    return summary
