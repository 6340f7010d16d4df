"""What a portable training step keeps alive, by ONNX Runtime's own account (workstation diagnostic).

One step runs with ONNX Runtime's profiler on and its optimized graph saved. The profiler gives the
order the nodes ran in and the shape of every output; the optimized graph, which node reads what.
A tensor is alive from the node that makes it to the last node that reads it (graph inputs are the
caller's and not counted). ``at_loss``: what is alive when the loss is computed, i.e. what the
forward hands to the backward; ``peak``: the most alive at once during the step.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ...engines.portable import PortableEngine, session_options

_ITEM_BYTES = {"float": 4, "int64": 8, "int32": 4, "bool": 1, "uint8": 1}
KINDS = {  # how the layout's ``kept`` describes a tensor -> its kind
    "selected input channels": "selected",
    "mask": "masks",
    "input of": "classifier input",
    "difference of the selected slice": "slice differences",
}


@dataclass
class Liveness:
    at_loss: dict[str, int]  # tensor -> bytes, alive when the loss is computed
    peak_bytes: int
    peak_node: str
    kept: dict[str, str]  # the layout's kept tensors -> what they are

    def kind(self, tensor: str) -> str:
        """``selected`` (input channels), ``masks``, ``classifier input``, ``slice differences``
        (grouped layers' selected weights minus the refreshed ones) or ``other``."""
        what = self.kept.get(tensor, "")
        for prefix, kind in KINDS.items():
            if what.startswith(prefix):
                return kind
        return "other"

    def by_kind(self) -> dict[str, int]:
        totals = Counter(dict.fromkeys([*KINDS.values(), "other"], 0))
        for tensor, size in self.at_loss.items():
            totals[self.kind(tensor)] += size
        return dict(totals)


def step_liveness(engine: PortableEngine, x: np.ndarray, y: np.ndarray) -> Liveness:
    """Run one step of ``engine`` (its selection and weights) under the profiler; see the module."""
    import onnxruntime

    layout = engine.layout
    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(engine.threads, step=True)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        session = onnxruntime.InferenceSession(engine.graph_bytes("step"), options, providers=["CPUExecutionProvider"])
        session.run(None, engine.step_feeds(x, y))
        events = json.loads(Path(session.end_profiling()).read_text())
        graph = onnx.load(Path(tmp) / "optimized.onnx", load_external_data=False).graph
    nodes = {node.name: node for node in graph.node}
    ran = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    order = [e["name"].removesuffix("_kernel_time") for e in ran]
    sizes = {}
    for event, name in zip(ran, order, strict=True):
        for output, typed in zip(nodes[name].output, event["args"].get("output_type_shape", []), strict=False):
            ((dtype, shape),) = typed.items()
            sizes[output] = _ITEM_BYTES.get(dtype, 4) * int(np.prod(shape))
    last_read = {tensor: step for step, name in enumerate(order) for tensor in nodes[name].input}
    outputs = {o.name for o in graph.output}
    loss_step = next(step for step, name in enumerate(order) if layout.loss_name in nodes[name].output)
    alive: dict[str, int] = {}
    peak, peak_node, at_loss = 0, "", {}
    for step, name in enumerate(order):
        alive.update({o: sizes[o] for o in nodes[name].output if o in sizes})
        if sum(alive.values()) > peak:
            peak, peak_node = sum(alive.values()), name
        if step == loss_step:
            at_loss = dict(alive)
        for tensor in [t for t in alive if last_read.get(t, -1) <= step and t not in outputs]:
            del alive[tensor]
    return Liveness(at_loss, peak, peak_node, layout.kept)
