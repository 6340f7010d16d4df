"""Make a plan: pick the layers and a channel budget whose predicted whole-process peak fits the
device's usable memory (workstation side, needs torch).

Default budget: ``DEFAULT_BUDGET`` of the full fine-tuning units, the accuracy-efficient one (past it,
more budget bought no accuracy in ``docs/reproduction.md``), or the largest that fits when that is
smaller. A larger budget is never taken by default just because the memory is there."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..core.budget import cap_budget, format_bytes, parse_budget
from ..core.layers import LayerCost, full_units
from ..core.memory import MemoryEstimate, RunShape, estimate_memory, fleet_parts, selection_patch_bytes
from ..core.plan import Plan
from ..core.selection import Selection, candidate_names, method_spec
from ..device.data import Dataset, load_dataset, load_transient_bytes
from ..device.profile import DeviceProfile
from ..device.progress import Progress
from ..engines.torch_masked import TorchMaskedEngine
from ..errors import PlanError
from .cost_trace import trace_layers
from .example_input import ImageInput
from .footprint import Footprint, trace_footprint
from .models import BuiltModel, build_model, model_normalization
from .ranking import Ranking

DEFAULT_TRAIN_IMAGES = 1000
DEFAULT_BUDGET = "2.5%"  # accuracy-efficient share of full fine-tuning units (docs/reproduction.md)
SPARSE_ENGINES = ("torch-sparse", "portable")  # keep only the selected channels: the budget trades memory


@dataclass
class PlanRequest:
    model: str
    profile: DeviceProfile
    image_size: int = 64
    batch_size: int = 32
    engine: str = "portable"
    method: str = "trady"
    budget: str | None = None  # None: DEFAULT_BUDGET, or the largest that fits if smaller
    ranking: str | None = None
    data: str | None = None
    per_class: int | None = None
    num_classes: int | None = None
    train_images: int | None = None
    seed: int = 0
    overflow: str = "skip"
    epochs: int = 10
    lr: float = 0.125
    warmup_epochs: int | None = None
    threshold: float = 0.97
    k_rule: str = "threshold"  # or "budget" (MeDyate: budget <= 20 % of the top-K memory)
    rank_epochs: int = 1
    trust_model_code: bool = False  # allow a model factory (Python code) as ``model``
    fleet: bool = False  # a fleet node: add Flower's processes and messages (core.memory.fleet_parts)
    compare_engines: bool = False  # also predict the other engines' peaks (Plan.engines)


@dataclass
class _Setup:
    built: BuiltModel
    layers: list[LayerCost]
    candidates: list[LayerCost]
    ranking: Ranking | None
    train: Dataset | None
    class_names: list[str] | None
    dataset_bytes: int
    load_bytes: int


def make_plan(req: PlanRequest, progress: Progress) -> Plan:
    _check_request(req)
    if method_spec(req.method).batchnorm != "frozen" and req.engine != "torch-masked":
        raise PlanError(
            f"method {req.method!r} trains BatchNorm with batch statistics, which only the torch-masked engine "
            "does: plan --engine torch-masked, or --method full-frozen-bn"
        )
    setup = _setup(req, progress)
    usable = req.profile.usable_memory_bytes
    baseline = _baseline(req.profile, req.engine)
    full = _footprint(setup, req.engine, setup.candidates)
    if req.budget is not None:
        resolved = parse_budget(req.budget).resolve(full_units(setup.layers))
        budget, note = cap_budget(resolved, setup.layers, req.batch_size)
        amount, unit = budget.amount, budget.unit
        bound, share = _budget_bounds(setup, req, amount, unit)
        estimate = _estimate(req, setup, full, baseline, bound, share=share)
        if estimate.peak_bytes > usable:
            _refuse(req, setup, estimate, usable, f"budget {req.budget}")
        notes = [note] if note else []
        if note:
            progress.line(f"note: {note}")
    else:
        amount, unit, estimate, notes = _default_budget(req, setup, full, baseline, usable)
    engines = []
    if req.compare_engines:
        engines = _compare_engines(req, setup, usable, *_budget_bounds(setup, req, amount, unit))
    return Plan(
        model=req.model,
        num_classes=setup.built.num_classes,
        image_size=req.image_size,
        normalization=model_normalization(req.model).to_dict(),
        batch_size=req.batch_size,
        engine=req.engine,
        method=req.method if amount > 0 else "classifier-only",
        seed=req.seed,
        overflow=req.overflow,
        epochs=req.epochs,
        lr=req.lr,
        warmup_epochs=req.warmup_epochs,
        layers=[layer.to_dict() for layer in setup.candidates],
        classifier=next(x for x in setup.layers if x.name == setup.built.classifier).to_dict(),
        budget=amount,
        budget_unit=unit,
        ranking={
            "threshold": req.threshold,
            "k": len(setup.candidates),
            "rule": req.k_rule,
            "source": setup.ranking.source if setup.ranking else None,
        },
        memory=estimate.to_dict(),
        profile=req.profile.to_dict(),
        usable_memory_bytes=usable,
        data={"spec": req.data, "per_class": req.per_class, "dataset_bytes": setup.dataset_bytes},
        class_names=setup.class_names,
        notes=notes,
        engines=engines,
    )


def _check_request(req: PlanRequest) -> None:
    """Refuse settings no run could use: learning rate, seed, epochs, a budget of nothing."""
    if not (math.isfinite(req.lr) and req.lr > 0):
        raise PlanError(f"learning rate {req.lr!r}: must be a finite number > 0")
    if req.seed < 0 or req.epochs < 1 or req.batch_size < 1:
        raise PlanError(f"seed ({req.seed}) must be >= 0, epochs ({req.epochs}) and batch size ({req.batch_size}) >= 1")
    budgeted = req.budget is not None and method_spec(req.method).rule in ("random", "rgn")
    if budgeted and parse_budget(req.budget).amount <= 0:
        raise PlanError(
            f"budget {req.budget!r} selects no channel: give a budget > 0, or --method classifier-only "
            "to train the classifier alone"
        )


def _setup(req: PlanRequest, progress: Progress) -> _Setup:
    norm = model_normalization(req.model)
    train = val = None
    if req.data:
        train = load_dataset(req.data, "train", req.image_size, norm, req.per_class, req.seed)
        val = load_dataset(req.data, "val", req.image_size, norm, req.per_class, req.seed)
    num_classes = train.num_classes if train else req.num_classes
    if not num_classes:
        raise PlanError("give --data (to rank layers and size the data set) or --num-classes")
    built = build_model(req.model, num_classes, req.image_size, req.seed, req.trust_model_code)
    layers = trace_layers(built.module, built.example)
    ranking = _ranking(req, built, train, val, progress)
    names = [layer.name for layer in layers if layer.name != built.classifier]
    top_k = ranking.top_k(req.threshold) if ranking else None
    chosen = candidate_names(req.method, names, top_k)
    images = len(train) + len(val) if train and val else (req.train_images or DEFAULT_TRAIN_IMAGES)
    per_image = req.image_size * req.image_size * 3
    load = load_transient_bytes(req.data) if req.data else 0
    by_name = {layer.name: layer for layer in layers}
    return _Setup(
        built,
        layers,
        [by_name[n] for n in chosen],
        ranking,
        train,
        train.class_names if train else None,
        images * per_image,
        load,
    )


def _ranking(req: PlanRequest, built, train, val, progress: Progress) -> Ranking | None:
    if method_spec(req.method).pool != "topk":
        return None
    if req.ranking:
        return Ranking.load(req.ranking)
    if train is None:
        raise PlanError(f"method {req.method!r} needs a layer ranking: give --ranking or --data")
    from .finetune import FinetuneSpec, Prepared, compute_ranking

    spec = FinetuneSpec(
        model=req.model,
        data=req.data,
        image_size=req.image_size,
        per_class=req.per_class,
        batch_size=req.batch_size,
        seed=req.seed,
        rank_epochs=req.rank_epochs,
        threshold=req.threshold,
        trust_model_code=req.trust_model_code,
    )
    layers = trace_layers(built.module, built.example)
    prep = Prepared(built, layers, train, val, parse_budget("100%"), full_units(layers))
    progress.line(f"ranking layers ({req.rank_epochs} epoch(s) of full fine-tuning on {train.source})")
    return compute_ranking(prep, spec, progress)


def _baseline(profile: DeviceProfile, engine: str) -> int:
    key = "ort" if engine in ("ort", "portable") else "torch"
    value = profile.runtime_baseline_bytes.get(key)
    if value is None:
        raise PlanError(f"profile {profile.name!r} has no runtime baseline for engine {engine!r} ({key})")
    return value


def _footprint(setup: _Setup, engine: str, layers: list[LayerCost]) -> Footprint:
    """Trace what the engine keeps when ``layers`` are trainable (all channels; sparse: one each)."""
    model = setup.built.module
    if engine in SPARSE_ENGINES:
        from ..engines.torch_sparse import TorchSparseEngine

        traced = TorchSparseEngine(model, setup.layers, setup.built.classifier, packed_masks=engine == "portable")
        selection = Selection(0, {layer.name: np.array([0]) for layer in layers}, 0.0)
    else:
        traced = TorchMaskedEngine(model, setup.layers, setup.built.classifier)
        selection = Selection(0, {layer.name: np.arange(layer.in_channels) for layer in layers}, 0.0)
    try:
        return trace_footprint(model, traced, selection, setup.built.example, setup.built.num_classes)
    finally:
        for param in model.parameters():
            param.requires_grad_(False)


def _budget_bounds(setup: _Setup, req: PlanRequest, amount: float, unit: str) -> tuple[float, float]:
    """What the selections within the budget hold: at most the bytes (weights + activations at the
    batch) of the channels with the most bytes per unit first, never more than every candidate
    channel; and on average (channels drawn at random) this share of every candidate channel."""
    batch = req.batch_size
    every_bytes = float(sum(c.bytes_per_channel(batch) * c.in_channels for c in setup.candidates))
    if unit == "bytes":
        return min(amount, every_bytes), min(1.0, amount / every_bytes) if every_bytes else 0.0
    if not setup.candidates:
        return amount * 4.0, 0.0
    bound, left = 0.0, amount
    for c in sorted(setup.candidates, key=lambda c: c.bytes_per_channel(batch) / c.unit_cost, reverse=True):
        units = min(left, c.total_units)
        bound += units * c.bytes_per_channel(batch) / c.unit_cost
        left -= units
        if left <= 0:
            break
    return bound, min(1.0, amount / sum(c.total_units for c in setup.candidates))


def _estimate(
    req: PlanRequest,
    setup: _Setup,
    fp: Footprint,
    baseline: int,
    budget_bytes: float,
    engine: str | None = None,
    share: float | None = None,
) -> MemoryEstimate:
    """The memory estimate with selections keeping at most ``budget_bytes``; ``share``: of every
    candidate channel on average (default: ``budget_bytes`` over them all, a budget in bytes)."""
    engine = engine or req.engine
    head = next(x for x in setup.layers if x.name == setup.built.classifier)
    head_bytes = (head.weight_count + head.out_channels) * 4
    if engine in SPARSE_ENGINES:  # only the selected slices: their activations and gradients
        saved_fixed = fp.saved_bytes_fixed + int(budget_bytes)
        gradients = head_bytes
    else:
        saved_fixed = fp.saved_bytes_fixed
        gradients = fp.trainable_weight_bytes
    portable = engine == "portable"
    if share is None:
        share = _budget_bounds(setup, req, budget_bytes, "bytes")[1]
    shape = RunShape(
        batch_size=req.batch_size,
        weight_bytes=fp.weight_bytes,
        input_bytes_per_sample=fp.input_bytes_per_sample,
        largest_activation_per_sample=fp.largest_activation_per_sample,
        forward_peak_per_sample=fp.forward_peak_per_sample,
        saved_bytes_per_sample=fp.saved_bytes_per_sample,
        saved_bytes_fixed=saved_fixed,
        gradient_bytes=gradients,
        dataset_bytes=setup.dataset_bytes,
        data_load_bytes=setup.load_bytes,
        runtime_baseline_bytes=baseline,
        patch_bytes=selection_patch_bytes(setup.candidates, req.batch_size, share) if portable else 0,
    )
    estimate = estimate_memory(engine, shape)
    if req.fleet:
        estimate.parts += fleet_parts(sum(4 * layer.weight_count for layer in setup.candidates) + head_bytes)
    return estimate


def _default_budget(
    req: PlanRequest, setup: _Setup, full: Footprint, baseline: int, usable: int
) -> tuple[float, str, MemoryEstimate, list[str]]:
    """DEFAULT_BUDGET when it fits (memory to spare buys no accuracy past it), else the largest that fits."""
    budget = parse_budget(DEFAULT_BUDGET).resolve(full_units(setup.layers))
    bound, share = _budget_bounds(setup, req, budget.amount, budget.unit)
    estimate = _estimate(req, setup, full, baseline, bound, share=share)
    if estimate.peak_bytes <= usable:
        note = (
            f"default budget {DEFAULT_BUDGET} of full fine-tuning: the accuracy-efficient one (more bought no "
            "accuracy in docs/reproduction.md); --budget to choose another"
        )
        return budget.amount, budget.unit, estimate, [note]
    amount, unit, estimate, notes = _largest_fitting(req, setup, full, baseline, usable)
    return amount, unit, estimate, [*notes, f"the default budget {DEFAULT_BUDGET} does not fit: the largest that does"]


def _largest_fitting(
    req: PlanRequest, setup: _Setup, full: Footprint, baseline: int, usable: int
) -> tuple[float, str, MemoryEstimate, list[str]]:
    """The largest budget (bytes at the batch size) whose predicted peak fits ``usable``."""
    top = sum(layer.bytes_per_channel(req.batch_size) * layer.in_channels for layer in setup.candidates)
    if req.engine not in SPARSE_ENGINES:
        estimate = _estimate(req, setup, full, baseline, top)
        if estimate.peak_bytes <= usable:
            note = (
                f"the {req.engine} engine keeps the full inputs of every candidate layer whatever the "
                "budget, so the budget is every candidate channel; use --engine portable to trade "
                "budget for memory"
            )
            return float(top), "bytes", estimate, [note]
        head_only = _footprint(setup, req.engine, [])
        estimate = _estimate(req, setup, head_only, baseline, 0)
        if estimate.peak_bytes > usable:
            _refuse(req, setup, estimate, usable, "the classifier alone")
        return 0.0, "bytes", estimate, ["only the classifier fits this device with this engine"]
    low, high = 0.0, float(top)
    estimate = _estimate(req, setup, full, baseline, 0)
    if estimate.peak_bytes > usable:
        _refuse(req, setup, estimate, usable, "the smallest plan")
    for _ in range(40):
        middle = (low + high) / 2
        if _estimate(req, setup, full, baseline, middle).peak_bytes <= usable:
            low = middle
        else:
            high = middle
    return float(int(low)), "bytes", _estimate(req, setup, full, baseline, int(low)), []


def _refuse(req: PlanRequest, setup: _Setup, estimate: MemoryEstimate, usable: int, what: str) -> None:
    suggestions = _suggestions(req, setup, usable)
    hint = ", ".join(suggestions) if suggestions else "nothing (no smaller batch or image size fits either)"
    raise PlanError(
        f"{what} does not fit {req.profile.name}: predicted peak {format_bytes(estimate.peak_bytes)} > usable "
        f"{format_bytes(usable)} (engine {req.engine}, batch {req.batch_size}, {req.image_size} px); what "
        f"would fit (training the classifier only): {hint}",
        details=estimate.table(),  # printed before the error line
    )


def _suggestions(req: PlanRequest, setup: _Setup, usable: int) -> list[str]:
    """Settings whose smallest plan (classifier only) fits: as asked, a smaller batch, a smaller image."""
    found = []
    baseline = _baseline(req.profile, req.engine)
    head_only = _footprint(setup, req.engine, [])
    if _estimate(req, setup, head_only, baseline, 0).peak_bytes <= usable:
        found.append(f"--method classifier-only at batch {req.batch_size}, {req.image_size} px")
    batch = req.batch_size // 2
    while batch >= 1:
        smaller = PlanRequest(**{**req.__dict__, "batch_size": batch})
        if _estimate(smaller, setup, head_only, baseline, 0).peak_bytes <= usable:
            found.append(f"--batch-size {batch}")
            break
        batch //= 2
    sizes = (req.image_size * 3 // 4, req.image_size // 2) if isinstance(setup.built.example, ImageInput) else ()
    for size in sizes:
        if size < 16 or size == req.image_size:
            continue
        built = build_model(req.model, setup.built.num_classes, size, req.seed, req.trust_model_code)
        layers = trace_layers(built.module, built.example)
        smaller_setup = _Setup(
            built, layers, [], None, None, None, setup.dataset_bytes * size**2 // req.image_size**2, setup.load_bytes
        )
        fp = _footprint(smaller_setup, req.engine, [])
        sized = PlanRequest(**{**req.__dict__, "image_size": size})
        if _estimate(sized, smaller_setup, fp, baseline, 0).peak_bytes <= usable:
            found.append(f"--image-size {size}")
            break
    return found


# Engines that cannot run on an architecture at all, whatever the memory (no wheel to install).
UNAVAILABLE = {("ort", "aarch64"): "no onnxruntime-training wheel exists for aarch64"}


def _compare_engines(req: PlanRequest, setup: _Setup, usable: int, budget_bytes: float, share: float) -> list[dict]:
    """The other engines' predicted peaks for this plan: at its budget and for the smallest plan
    (the classifier only), whether they fit, and why not."""
    rows = []
    for engine in ("portable", "torch-sparse", "torch-masked", "ort"):
        if engine == req.engine:
            continue
        key = "ort" if engine in ("ort", "portable") else "torch"
        baseline = req.profile.runtime_baseline_bytes.get(key)
        row: dict = {"engine": engine, "at_budget_bytes": None, "smallest_bytes": None}
        if baseline is None:
            row.update(fits="unknown", reason=f"the profile has no {key} runtime baseline")
            rows.append(row)
            continue
        sparse = engine in SPARSE_ENGINES
        full = _footprint(setup, engine, setup.candidates)
        head = full if sparse else _footprint(setup, engine, [])
        at_budget = _estimate(req, setup, full, baseline, budget_bytes, engine, share).peak_bytes
        smallest = _estimate(req, setup, head, baseline, 0, engine).peak_bytes
        fits = "yes" if at_budget <= usable else "classifier only" if smallest <= usable else "no"
        reasons = []
        if fits != "yes":
            why = "keeps the full input of every candidate layer" if not sparse else "at this budget"
            reasons.append(f"{why}: {format_bytes(at_budget)} > usable {format_bytes(usable)}")
        if fits == "no":
            reasons.append(f"even the classifier alone needs {format_bytes(smallest)}")
        if key == "torch" and fits != "yes":
            reasons.append(f"the torch runtime alone takes {format_bytes(baseline)}")
        blocked = UNAVAILABLE.get((engine, req.profile.arch))
        if blocked:
            fits = "no"
            reasons.insert(0, blocked)
        row.update(at_budget_bytes=at_budget, smallest_bytes=smallest, fits=fits, reason="; ".join(reasons))
        rows.append(row)
    return rows
