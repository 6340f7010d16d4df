"""The Flower ``ClientApp`` of a device: one process per round, started by the SuperNode.

A user-facing failure (another artifact, missing data, another protocol version) is logged on one
``error:`` line and sent back as a refusal, so the server says why the node sat the round out.
"""

from __future__ import annotations

import sys

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from .. import __version__
from ..errors import EdgeTradyError
from .client import NodeSettings, runtime_facts, train_round
from .protocol import GLOBAL, TASK, decode_state, read_task, refusal_content, reply_content

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = context.node_config
    info = {"node": str(config.get("name", context.node_id)), "version": __version__}
    try:
        settings = NodeSettings.from_config(config)
        task = read_task(msg.content[TASK])
        update, report, engine = train_round(settings, task, decode_state(msg.content[GLOBAL]))
    except EdgeTradyError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return Message(refusal_content(str(exc), info), reply_to=msg)
    print(
        f"round {task.round}/{task.rounds}: {report.examples} images, loss {report.train_loss:.4f}, "
        f"{report.channels} channels, {report.seconds:.1f}s",
        file=sys.stderr,
        flush=True,
    )
    runtime = runtime_facts()
    facts = {"engine": engine, "onnxruntime": runtime["onnxruntime"], "torch_loaded": runtime["torch_loaded"]}
    return Message(reply_content(update, report, {**info, **facts}), reply_to=msg)
