"""Forms of a strided depthwise conv's input gradient in ONNX Runtime, timed on EfficientNet-Lite0's
strided depthwise shapes (batch 32): what ``rules/conv.py`` chooses (``TRANSPOSE_FROM``) is measured here.

- ``pad``: spread the output gradient with stride - 1 zeros by a ``Pad`` of its 6-D view, then a
  stride-1 depthwise ``Conv`` with the flipped kernel (the form before issue 23);
- ``depth-to-space``: the same, the zeros spread by ``Concat`` with zero blocks + ``DepthToSpace``;
- ``conv-transpose``: one depthwise ``ConvTranspose``.

Every form's result is checked against ``conv-transpose`` (the op's definition). Each form is a small
graph; a worker in the device environment (plain onnxruntime, one thread) times them interleaved:
the minimum over rounds of the median CPU time of a run.

    flock /work/locks/timing.lock python bench/conv_forms.py

Writes bench/results/conv_forms.{csv,json} and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from benchlib import RESULTS, device_python

FORMS = ("pad", "depth-to-space", "conv-transpose")
SHAPES = {  # name -> (channels, input size, kernel): the strided depthwise layers of EfficientNet-Lite0
    "64 px _blocks.1": (96, 32, 3),
    "64 px _blocks.3": (144, 16, 5),
    "64 px _blocks.5": (240, 8, 5),
    "64 px _blocks.11": (672, 4, 5),
    "128 px _blocks.3": (144, 32, 5),
    "128 px _blocks.5": (240, 16, 5),
    "128 px _blocks.11": (672, 8, 5),
}


def graph(form: str, batch: int, channels: int, size: int, kernel: int):
    """The input gradient of a stride-2 'same' depthwise conv as a model: gy in, dx out."""
    from onnx import TensorProto, helper, numpy_helper

    pad, stride = kernel // 2, 2
    out = (size + 2 * pad - kernel) // stride + 1
    extra = size - ((out - 1) * stride - 2 * pad + kernel)
    weight = np.random.default_rng(0).standard_normal((channels, 1, kernel, kernel)).astype(np.float32)
    inits = []

    def ints(name: str, values: list[int]) -> str:
        inits.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    flipped = numpy_helper.from_array(np.ascontiguousarray(weight[:, :, ::-1, ::-1]), "flipped")
    span = kernel - 1
    flipped_pads = [span - pad, span - pad, span - pad + extra, span - pad + extra]
    conv = {"group": channels, "kernel_shape": [kernel, kernel], "pads": flipped_pads}
    end = (out - 1) * stride + 1
    crop = ["starts", "ends", "ax"]
    if form == "conv-transpose":
        inits.append(numpy_helper.from_array(weight, "w"))
        attrs = {"group": channels, "strides": [2, 2], "pads": [pad] * 4, "output_padding": [extra] * 2}
        nodes = [helper.make_node("ConvTranspose", ["gy", "w"], ["dx"], kernel_shape=[kernel, kernel], **attrs)]
    elif form == "pad":
        inits.append(flipped)
        crop = [ints("starts", [0, 0]), ints("ends", [end, end]), ints("ax", [2, 3])]
        nodes = [
            helper.make_node("Unsqueeze", ["gy", ints("axes", [3, 5])], ["u"]),
            helper.make_node("Pad", ["u", ints("pads", [0] * 6 + [0, 0, 0, 1, 0, 1])], ["p"]),
            helper.make_node("Reshape", ["p", ints("shape", [0, 0, 2 * out, 2 * out])], ["m"]),
            helper.make_node("Slice", ["m", *crop], ["s"]),
            helper.make_node("Conv", ["s", "flipped"], ["dx"], **conv),
        ]
    else:
        inits.append(flipped)
        crop = [ints("starts", [0, 0]), ints("ends", [end, end]), ints("ax", [2, 3])]
        zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
        nodes = [
            helper.make_node("Shape", ["gy"], ["shape"]),
            helper.make_node("ConstantOfShape", ["shape"], ["z"], value=zero),
            helper.make_node("Concat", ["gy", "z", "z", "z"], ["c"], axis=1),
            helper.make_node("DepthToSpace", ["c"], ["d"], blocksize=2, mode="DCR"),
            helper.make_node("Slice", ["d", *crop], ["s"]),
            helper.make_node("Conv", ["s", "flipped"], ["dx"], **conv),
        ]
    inputs = [helper.make_tensor_value_info("gy", TensorProto.FLOAT, [batch, channels, out, out])]
    outputs = [helper.make_tensor_value_info("dx", TensorProto.FLOAT, [batch, channels, size, size])]
    model = helper.make_model(
        helper.make_graph(nodes, form, inputs, outputs, inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    return model


def worker(paths: list[str], rounds: int) -> dict[str, float]:
    """Minimum over ``rounds`` of the median CPU ms of each model (one thread), interleaved."""
    import onnxruntime

    sessions = {}
    for path in paths:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        shape = session.get_inputs()[0].shape
        sessions[path] = (session, np.random.default_rng(1).standard_normal(shape).astype(np.float32))
    best: dict[str, list[float]] = {path: [] for path in paths}
    for _ in range(rounds):
        for path, (session, gy) in sessions.items():
            times = []
            for _ in range(12):
                started = time.process_time()
                session.run(None, {"gy": gy})
                times.append(time.process_time() - started)
            best[path].append(statistics.median(times[2:]))
    return {path: 1e3 * min(values) for path, values in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print("RESULT " + json.dumps(worker(args.worker, args.rounds)), flush=True)
        return
    import onnxruntime

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, (channels, size, kernel) in SHAPES.items():
            results = {}
            for form in FORMS:
                model = graph(form, args.batch_size, channels, size, kernel)
                path = Path(tmp) / f"{name.replace(' ', '_')}-{form}.onnx"
                path.write_bytes(model.SerializeToString())
                paths[(name, form)] = str(path)
                session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                gy = np.random.default_rng(1).standard_normal(session.get_inputs()[0].shape).astype(np.float32)
                results[form] = session.run(None, {"gy": gy})[0]
            error = max(float(np.abs(results[f] - results["conv-transpose"]).max()) for f in FORMS)
            if error > 1e-4 * float(np.abs(results["conv-transpose"]).max()):
                raise SystemExit(f"error: the forms of {name} differ by {error}")
            rows.append({"layer": name, "channels": channels, "input": f"{size}x{size}", "kernel": kernel})
        command = [str(device_python()), __file__, "--rounds", str(args.rounds), "--worker", *paths.values()]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
        times = json.loads(line[len("RESULT ") :])
    for row in rows:
        for form in FORMS:
            row[f"{form}_ms"] = times[paths[(row["layer"], form)]]
        row["fastest"] = min(FORMS, key=lambda form: row[f"{form}_ms"])
    lines = [f"| layer | channels | input | kernel | {' | '.join(f'{f} ms' for f in FORMS)} | fastest |"]
    lines.append("|---" * (5 + len(FORMS)) + "|")
    for r in rows:
        cells = " | ".join(f"{r[f'{f}_ms']:.2f}" for f in FORMS)
        lines.append(f"| {r['layer']} | {r['channels']} | {r['input']} | {r['kernel']} | {cells} | {r['fastest']} |")
    print("\n".join(lines))
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python bench/conv_forms.py " + " ".join(sys.argv[1:]), "batch": args.batch_size}
    (RESULTS / "conv_forms.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    with open(RESULTS / "conv_forms.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
