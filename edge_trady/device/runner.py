"""The device runner (no torch): verify a training artifact, check memory and data against it,
fine-tune it with the ONNX Runtime engine and the shared training loop, export the result."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..core.atomic import replacing, write_json
from ..core.budget import Budget, format_bytes
from ..core.layers import LayerCost, channel_costs
from ..core.memory import DATA_SET_PART
from ..core.plan import Plan
from ..core.selection import CandidateLayer, ChannelSampler, candidate_names, method_spec
from ..errors import ArtifactError, DataError, MemoryGuardError, PlanError
from .data import Dataset, Normalization, load_dataset, validation_source
from .heap import pin_mmap_threshold
from .loop import TrainConfig, fell_below, train
from .manifest import MANIFEST_FILE, Manifest, ModelInfo, sha256_file
from .memwatch import current_rss_bytes, peak_rss_bytes
from .profile import available_memory, default_threads
from .progress import Progress
from .rundir import DONE_FILE, SUMMARY_FILE, TRAINING_OUTPUTS, open_run_folder, run_finished

MODEL_FILE = "model.onnx"
# Address space ONNX Runtime maps when a session starts without touching it (a malloc arena and a
# stack per thread): measured +378 MiB VmSize for +32 MiB VmRSS on 2 cores here; below ~64 MiB per
# core of spare address space, its C++ code aborts (std::bad_alloc) where Python cannot report it.
# Counted only under an address-space limit (RLIMIT_AS), before the engine is loaded.
ENGINE_ADDRESS_SPACE_PER_CORE = 64 * 2**20
RUN_OUTPUTS = TRAINING_OUTPUTS.with_files(MODEL_FILE, ModelInfo.sidecar(Path(MODEL_FILE)).name)


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


def check_memory(
    predicted_peak: int,
    force: bool,
    progress: Progress,
    what: str = "the plan's predicted peak",
    address_space_reserve: int = 0,
) -> None:
    """Refuse (MemoryGuardError) when the predicted whole-process peak exceeds what this process
    can have: what it already uses plus what is available. ``force`` warns instead."""
    available, limit = available_memory(address_space_reserve)
    usable = current_rss_bytes() + available
    if predicted_peak <= usable:
        return
    problem = (
        f"{what} {format_bytes(predicted_peak)} exceeds the memory available to this run, "
        f"{format_bytes(usable)} (limited by {limit})"
    )
    if not force:
        raise MemoryGuardError(
            f"{problem}: free memory, raise the memory limit or re-plan for this device "
            "(--force runs anyway and may be killed)"
        )
    progress.line(f"warning: {problem}; running anyway (--force)")


def check_loaded_data(plan: Plan, data: list[Dataset], force: bool, progress: Progress) -> None:
    """After loading: compare the data's real size and image count with what the plan assumed,
    re-check the fit with the real size, and say when loading alone went past the predicted peak."""
    estimate = plan.estimate
    planned = sum(part.bytes for part in estimate.parts if part.name == DATA_SET_PART)
    real = sum(d.nbytes for d in data)
    images, planned_images = sum(len(d) for d in data), planned // (3 * plan.image_size**2)
    peak = estimate.peak_bytes - planned + real
    if real > planned:
        progress.line(
            f"note: the data holds {images} images ({format_bytes(real)}), the plan assumed {planned_images} "
            f"({format_bytes(planned)}): predicted peak {format_bytes(estimate.peak_bytes)} -> {format_bytes(peak)}"
        )
        check_memory(peak, force, progress, f"with the data as loaded ({images} images), the predicted peak")
    loading = peak_rss_bytes()
    if loading > max(peak, estimate.peak_bytes):
        progress.line(
            f"warning: loading the data peaked at {format_bytes(loading)}, above the predicted peak of the "
            f"whole run ({format_bytes(max(peak, estimate.peak_bytes))}): large source images?"
        )


def check_selection_inputs(manifest: Manifest, where: Path) -> None:
    """Raise ArtifactError unless the manifest's selection inputs name exactly the plan's candidate
    layers, with their input channels."""
    plan_layers = {layer["name"]: layer["in_channels"] for layer in manifest.plan.layers}
    listed = {entry["layer"]: entry["channels"] for entry in manifest.selection_inputs.values()}
    if listed != plan_layers or len(listed) != len(manifest.selection_inputs):
        name = next(iter(sorted(set(listed.items()) ^ set(plan_layers.items()))), ("a layer listed twice",))[0]
        raise ArtifactError(
            f"{where}: the plan's candidate layers differ from the manifest's selection inputs (first: {name!r}); "
            "export the artifact again"
        )


def check_data(data: Dataset, num_classes: int, class_names: list[str] | None, image_size: int) -> None:
    """Raise DataError unless ``data`` has the model's classes and input size."""
    if data.num_classes != num_classes:
        names = f" ({', '.join(class_names)})" if class_names else ""
        raise DataError(f"{data.source}: {data.num_classes} classes, the model has {num_classes}{names}")
    pair = [data.class_names, class_names]
    if all(names and not _numbered(names) for names in pair) and pair[0] != pair[1]:
        if len(pair[0]) != len(pair[1]):
            raise DataError(f"{data.source}: {len(pair[0])} class names, the model's manifest lists {len(pair[1])}")
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
    overwrite: bool = False  # replace the files of a previous run in ``out``
    force: bool = False  # run even if the memory guard says it will not fit
    checkpoint_every: int = 0
    threads: int | None = None  # ONNX Runtime intra-op threads (default: profile.default_threads)


@dataclass
class RunSummary:
    """``summary.json`` of a device run."""

    artifact_sha256: str
    model: str
    method: str
    epochs: int
    train_images: int
    val_images: int
    initial_val_acc: float | None  # before training (a resumed run: as its checkpoint recorded)
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


def open_engine(manifest: Manifest, artifact: Path, threads: int | None = None):
    """The engine of the artifact's format (it loads onnxruntime: only when a run really starts),
    checked against the plan the manifest carries; ``threads``: ONNX Runtime's intra-op threads
    (default: ``profile.default_threads``)."""
    pin_mmap_threshold()  # the engines free and re-create sessions and tensors of a few MiB
    threads = threads or default_threads()
    if manifest.format == "onnx":
        from ..engines.portable import PortableEngine

        engine = PortableEngine(artifact, threads=threads)
    else:
        from ..engines.ort_training import C, OrtEngine

        options = C.SessionOptions()
        options.intra_op_num_threads = threads
        engine = OrtEngine(artifact, options=options)
    for layer in manifest.plan.layer_costs:
        if engine.layers.get(layer.name) != layer:
            raise ArtifactError(
                f"{artifact}: the plan in its manifest does not match its graph (layer {layer.name!r}): export it again"
            )
    check_selection_inputs(manifest, artifact)
    return engine


def run(request: RunRequest, progress: Progress) -> RunSummary | None:
    """Fine-tune the artifact on the device; writes the run folder and returns its summary (None:
    ``--resume`` on a finished run, which does nothing and changes no file)."""
    if request.resume and run_finished(request.out):
        progress.line(f"{request.out}: the run there has finished ({DONE_FILE}); nothing to do")
        return None
    started = time.monotonic()
    manifest = Manifest.load(request.artifact)
    plan = manifest.plan
    sampler = plan_sampler(plan)
    reserve = ENGINE_ADDRESS_SPACE_PER_CORE * (os.cpu_count() or 1)
    check_memory(plan.estimate.peak_bytes, request.force, progress, address_space_reserve=reserve)
    progress.predicted_peak_bytes = plan.estimate.peak_bytes
    with open_run_folder(request.out, RUN_OUTPUTS, request.resume, request.overwrite, progress) as folder:
        if folder.finished:
            return None
        train_data, val_data = load_data(manifest, request)
        check_loaded_data(plan, [train_data, val_data], request.force, progress)
        threads = request.threads or default_threads()
        engine = open_engine(manifest, request.artifact, threads)
        check_memory(plan.estimate.peak_bytes, request.force, progress, "with the engine loaded, the predicted peak")
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
            f"({len(sampler.layers)} candidate layers), predicted peak {format_bytes(plan.estimate.peak_bytes)}, "
            f"{threads} thread{'s' if threads > 1 else ''}"
        )
        origin = {
            "artifact_sha256": manifest.artifact_sha256,
            "manifest_sha256": sha256_file(Path(request.artifact) / MANIFEST_FILE),
        }
        out, resume = folder.path, folder.resume
        result = train(engine, sampler, train_data, val_data, config, out, progress, None, resume, origin)
        model = folder.path / MODEL_FILE
        with replacing(model) as tmp:
            engine.export_inference(tmp)
        ModelInfo.of(manifest).save(model)
        last = result.epochs[-1]
        summary = RunSummary(
            artifact_sha256=manifest.artifact_sha256,
            model=plan.model,
            method=plan.method,
            epochs=len(result.epochs),
            train_images=len(train_data),
            val_images=len(val_data),
            initial_val_acc=result.initial_val_acc,
            final_train_loss=last["train_loss"],
            final_train_acc=last["train_acc"],
            final_val_loss=last["val_loss"],
            final_val_acc=last["val_acc"],
            predicted_peak_bytes=plan.estimate.peak_bytes,
            peak_rss_bytes=peak_rss_bytes(),
            seconds=time.monotonic() - started,
            accuracy_fell=fell_below(result.initial_val_acc, last["val_acc"]),
        )
        write_json(folder.path / SUMMARY_FILE, asdict(summary), indent=2)
        folder.finish("run")
    return summary
