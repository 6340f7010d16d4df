"""The forward ONNX graph both exporters start from: what the PyTorch model computes in ``eval()``.

ONNX Runtime's training graph would turn every BatchNormalization into training-mode BN, and the
portable exporter differentiates a small op set, so no BN is left: a BN after a frozen conv is
folded into that conv, a BN after a trained layer becomes a constant per-channel affine (folding it
would change the gradient and the SGD trajectory). Zero padding in front of a conv (EfficientNet's
``Conv2dStaticSamePadding``) is merged into the Conv's ``pads``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import sys
import warnings
from collections import Counter
from collections.abc import Iterator

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import fx, nn

from ...core.layers import LayerCost
from ...errors import ArtifactError

INPUT, LABELS, LOGITS = "input", "labels", "logits"
log = logging.getLogger(__name__)


class ConstantAffine(nn.Module):
    """``x * scale + shift`` per channel: an eval-mode BatchNorm2d with nothing left to train."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.reshape(-1, 1, 1))
        self.register_buffer("shift", shift.reshape(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


class _ZeroPadFn(torch.autograd.Function):
    """F.pad that exports as one ``Pad`` with constant pads (mergeable into the next Conv)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, padding: tuple[int, int, int, int]) -> torch.Tensor:
        return F.pad(x, padding)

    @staticmethod
    def symbolic(g, x, padding):
        left, right, top, bottom = padding
        pads = torch.tensor([0, 0, top, left, 0, 0, bottom, right], dtype=torch.int64)
        return g.op("Pad", x, g.op("Constant", value_t=pads), mode_s="constant")


class ZeroPad(nn.Module):
    """``nn.ZeroPad2d`` in the copy that is exported (never run backward in torch)."""

    def __init__(self, padding: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ZeroPadFn.apply(x, self.padding)


def check_layers(model: nn.Module, costs: dict[str, LayerCost], trainable: list[str], classifier: str) -> None:
    """Raise ArtifactError unless the classifier is a Linear and every trainable layer a traced
    Conv2d or Linear of ``model``."""
    modules = dict(model.named_modules())
    if not isinstance(modules.get(classifier), nn.Linear):
        kind = type(modules[classifier]).__name__ if classifier in modules else "missing"
        raise ArtifactError(f"classifier {classifier!r} must be an nn.Linear layer ({kind})")
    for name in trainable:
        module = modules.get(name)
        if module is None:
            raise ArtifactError(f"trainable layer {name!r}: the model has no such layer")
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise ArtifactError(
                f"trainable layer {name!r} is a {type(module).__name__}: only Conv2d and Linear weights can be trained"
            )
        if name not in costs:
            raise ArtifactError(f"trainable layer {name!r} has no LayerCost (trace it first)")


class _LeafTracer(fx.Tracer):
    """Keeps Conv2d (incl. subclasses such as EfficientNet's same-padding conv) and BN as nodes."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        leaves = (nn.Conv2d, nn.modules.batchnorm._BatchNorm)
        return isinstance(module, leaves) or super().is_leaf_module(module, qualified_name)


def _bn_producers(model: nn.Module) -> dict[str, str]:
    """BatchNorm name -> the Conv2d whose output only that BN reads ({} if fx cannot trace)."""
    try:
        graph = _LeafTracer().trace(model)
    except Exception as exc:  # e.g. data-dependent control flow
        log.info("torch.fx cannot trace the model (%s): every BatchNorm becomes an affine", exc)
        return {}
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        source = node.args[0]
        if (
            isinstance(source, fx.Node)
            and source.op == "call_module"
            and isinstance(modules[source.target], nn.Conv2d)
            and len(source.users) == 1
            and calls[source.target] == calls[node.target] == 1
        ):
            pairs[node.target] = source.target
    return pairs


def export_copy(model: nn.Module, trained: set[str]) -> nn.Module:
    """An eval-mode deep copy with no BatchNorm left and export-friendly zero pads."""
    work = copy.deepcopy(model).eval()
    producers = _bn_producers(work)
    for name, module in list(work.named_modules()):
        if isinstance(module, nn.ZeroPad2d):
            _replace(work, name, ZeroPad(tuple(module.padding)))
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        if not isinstance(module, nn.BatchNorm2d) or not module.track_running_stats:
            raise ArtifactError(
                f"layer {name!r} ({type(module).__name__}): only BatchNorm2d with running statistics can be exported"
            )
        with torch.no_grad():
            scale = module.running_var.add(module.eps).rsqrt()
            if module.affine:
                scale = scale * module.weight
            shift = -module.running_mean * scale
            if module.affine:
                shift = shift + module.bias
        conv = producers.get(name)
        if conv is not None and conv not in trained:
            _fold(work.get_submodule(conv), scale, shift)
            _replace(work, name, nn.Identity())
        else:
            _replace(work, name, ConstantAffine(scale, shift))
    return work


def _fold(conv: nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor) -> None:
    with torch.no_grad():
        bias = shift if conv.bias is None else conv.bias * scale + shift
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
        conv.bias = nn.Parameter(bias, requires_grad=False)


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def to_onnx(model: nn.Module, image_size: int, opset: int | None = None) -> onnx.ModelProto:
    """The eval-mode forward of ``model`` (image in, logits out, dynamic batch); every parameter
    and buffer is an initializer (none is a graph input). ``opset=None``: the exporter's default."""
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), _stdout_fd_silenced():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (torch.zeros(2, 3, image_size, image_size),),
                buffer,
                dynamo=False,
                opset_version=opset,
                training=torch.onnx.TrainingMode.EVAL,
                do_constant_folding=False,
                export_params=True,
                keep_initializers_as_inputs=True,  # else equal-valued weights are deduplicated
                input_names=[INPUT],
                output_names=[LOGITS],
                dynamic_axes={INPUT: {0: "batch"}, LOGITS: {0: "batch"}},
            )
    except Exception as exc:
        raise ArtifactError(f"ONNX export failed: {first_line(str(exc))}") from exc
    model = onnx.load_from_string(buffer.getvalue())
    inputs = [i for i in model.graph.input if i.name == INPUT]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    return model


def merge_pads(model: onnx.ModelProto) -> None:
    """Fold each constant zero ``Pad`` on H/W that only feeds Conv data inputs into those Convs."""
    graph = model.graph
    consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    for pad in [n for n in graph.node if n.op_type == "Pad"]:
        users = consumers.get(pad.output[0], [])
        extra = _zero_hw_pads(pad, consts)
        if (
            extra is None
            or pad.output[0] in outputs
            or not users
            or not all(_plain_conv_reading(user, pad.output[0]) for user in users)
        ):
            continue
        for conv in users:
            _add_conv_pads(conv, extra)
            conv.input[0] = pad.input[0]
        graph.node.remove(pad)
    used = {name for node in graph.node for name in node.input}
    for const in [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]:
        graph.node.remove(const)


def _zero_hw_pads(pad: onnx.NodeProto, consts: dict[str, onnx.NodeProto]) -> tuple[int, int, int, int] | None:
    """(top, left, bottom, right) of a constant zero Pad of an NCHW tensor's H and W, else None."""
    mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
    pads = _constant(consts, pad.input[1])
    value = _constant(consts, pad.input[2]) if len(pad.input) > 2 and pad.input[2] else 0
    if (
        mode != b"constant"
        or len(pad.input) > 3
        or pads is None
        or pads.shape != (8,)
        or pads[[0, 1, 4, 5]].any()
        or (pads < 0).any()
        or value is None
        or np.any(value)
    ):
        return None
    return int(pads[2]), int(pads[3]), int(pads[6]), int(pads[7])


def _plain_conv_reading(node: onnx.NodeProto, name: str) -> bool:
    """True if ``node`` is a Conv without auto_pad that reads ``name`` as its data input only."""
    auto_pad = next((a.s for a in node.attribute if a.name == "auto_pad"), b"NOTSET")
    return node.op_type == "Conv" and auto_pad == b"NOTSET" and node.input[0] == name and name not in node.input[1:]


def _constant(consts: dict[str, onnx.NodeProto], name: str) -> np.ndarray | None:
    node = consts.get(name)
    if node is None:
        return None
    attr = next((a for a in node.attribute if a.name == "value"), None)
    return None if attr is None else numpy_helper.to_array(attr.t)


def _add_conv_pads(conv: onnx.NodeProto, extra: tuple[int, int, int, int]) -> None:
    """Add (top, left, bottom, right) to a Conv's pads ([top, left, bottom, right] in ONNX)."""
    attr = next((a for a in conv.attribute if a.name == "pads"), None)
    current = list(attr.ints) if attr is not None else [0, 0, 0, 0]
    merged = [a + b for a, b in zip(current, extra, strict=True)]
    if attr is not None:
        conv.attribute.remove(attr)
    conv.attribute.append(helper.make_attribute("pads", merged))


def forward_graph(model: nn.Module, trained: set[str], image_size: int, opset: int | None = None) -> onnx.ModelProto:
    """The eval-mode forward of ``model`` without BatchNorm and with pads merged into convs;
    ``trained`` layers keep their own weights (a BN after them becomes a constant affine)."""
    graph = to_onnx(export_copy(model, trained), image_size, opset)
    merge_pads(graph)
    return graph


@contextlib.contextmanager
def _stdout_fd_silenced() -> Iterator[None]:
    """The TorchScript exporter dumps its whole IR graph to the C stdout when an op fails."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0] if text else "unknown error"
