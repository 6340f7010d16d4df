"""``edge-trady evaluate``: accuracy and loss of an inference model with plain ONNX Runtime (no torch)."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np


@click.command("evaluate")
@click.argument("model_path", metavar="MODEL.onnx", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--data",
    "data_spec",
    required=True,
    help="'fashion-mnist[:DIR]', an image folder, an .npz file or 'synthetic[:CLASSES]'.",
)
@click.option(
    "--split",
    type=click.Choice(["val", "train", "all"]),
    default=None,
    help="Which images of --data to score. Default: its validation part when it has one (Fashion-MNIST's "
    "t10k test files, an .npz's x_val/y_val, an image folder's val/ or test/), else all of them: a test "
    "file is scored whole. 'val' of a file without validation part is the run's seeded 20% holdout.",
)
@click.option(
    "--per-class",
    type=click.IntRange(1),
    default=None,
    help="At most this many images per class (seeded as in the run, so the same images).",
)
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--verbose", is_flag=True, help="Also print the accuracy of every class.")
def command(
    model_path: str, data_spec: str, split: str | None, per_class: int | None, batch_size: int, verbose: bool
) -> None:
    """Evaluate MODEL.onnx (from 'edge-trady run') on a data set.

    Preprocessing (input size, normalisation) and class names come from the model.json next to the
    model. Every image of --data is scored unless it has a validation part or --split says otherwise;
    the output says how many images were scored and where they came from. Example:

      edge-trady evaluate run/model.onnx --data test.npz --verbose
    """
    from ..device.data import Normalization, evaluation_split, load_dataset
    from ..device.loop import evaluate
    from ..device.manifest import ModelInfo
    from ..device.runner import check_data

    path = Path(model_path)
    info = ModelInfo.load(path)
    norm = Normalization.from_dict(info.normalization)
    data = load_dataset(data_spec, split or evaluation_split(data_spec), info.image_size, norm, per_class, info.seed)
    check_data(data, info.num_classes, info.class_names, info.image_size)
    model = InferenceModel(path, info.input["name"])
    loss, accuracy = evaluate(model, data, batch_size)
    correct = model.predictions() == data.labels
    click.echo(
        f"accuracy {accuracy:.4f} ({int(correct.sum())}/{len(data)}) loss {loss:.4f} on {len(data)} images of "
        f"{data.source}"
    )
    if verbose:
        width = max(len(name) for name in data.class_names)
        for index, name in enumerate(data.class_names):
            hits = correct[data.labels == index]
            share = f"{hits.mean():.4f}" if len(hits) else "n/a"
            click.echo(f"  {name:<{width}}  {share} ({int(hits.sum())}/{len(hits)})")


class InferenceModel:
    """``predict`` (the Engine method ``loop.evaluate`` calls) over an ``InferenceSession``; keeps the
    predicted classes in call order."""

    def __init__(self, path: Path, input_name: str) -> None:
        from ..engines.ort_runtime import ort_bindings
        from ..errors import ArtifactError, out_of_memory

        ort_bindings()  # imports onnxruntime without letting it import torch
        import onnxruntime

        try:
            self._session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise out_of_memory(exc) or ArtifactError(f"{path}: cannot load the model ({exc})") from exc
        self._input = input_name
        self._predicted: list[np.ndarray] = []

    def predict(self, x: np.ndarray) -> np.ndarray:
        logits = self._session.run(None, {self._input: x})[0]
        self._predicted.append(logits.argmax(axis=1))
        return logits

    def predictions(self) -> np.ndarray:
        return np.concatenate(self._predicted)
