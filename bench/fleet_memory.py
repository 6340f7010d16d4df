"""What a fleet node costs in memory: the VmHWM of its SuperNode, its SuperExec and the ClientApp
that trains a round, against the same round trained without Flower and the planner's prediction.

For each engine: a fleet of one node (real Flower processes on 127.0.0.1) runs 2 rounds while every
process's VmHWM is polled; then a fresh process trains the same round with ``fleet.client.train_round``
alone (no Flower imported). The difference is Flower's share of the ClientApp.

    nice -n 10 python bench/fleet_memory.py

Writes bench/results/fleet-memory.csv / .json and prints the table (docs/fleet.md, "Memory").
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from benchlib import RESULTS, ROOT
from fleetlib import Fleet, PeakWatcher, make_artifact, make_plan

from edge_trady.core.atomic import write_json, write_text
from edge_trady.core.memory import MemoryEstimate
from edge_trady.core.plan import Plan
from edge_trady.device.manifest import Manifest
from edge_trady.fleet.partition import write_partitions
from edge_trady.fleet.state import RunFolder

MiB = 2**20
ALONE = """
import json, sys
from pathlib import Path
from edge_trady.device.memwatch import peak_rss_bytes
from edge_trady.fleet.client import NodeSettings, train_round
from edge_trady.fleet.task import RoundTask
import numpy as np
artifact, data, out, engine, sha, state_file = sys.argv[1:]
state = dict(np.load(state_file))
settings = NodeSettings("alone", Path(artifact), data, Path(out), engine)
train_round(settings, RoundTask(1, 2, 1, sha), state)
print(json.dumps({"peak": peak_rss_bytes(), "flwr": "flwr" in sys.modules, "torch": "torch" in sys.modules}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", nargs="+", default=["portable", "ort", "torch-sparse"])
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--budget", default="2%")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=25, help="images per class on the node")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fleet-memory-"))
    (data,) = (p.path for p in write_partitions("fashion-mnist", 1, work / "parts", args.image_size,
                                                 per_class=args.per_class))  # fmt: skip
    rows = []
    for engine in args.engines:  # torch-sparse trains the portable artifact
        sizes = (args.image_size, args.budget, args.batch_size, 0.125)
        artifact = make_artifact(work, *sizes, engine="ort" if engine == "ort" else "portable")
        estimate = Plan.load(make_plan(work, *sizes, engine=engine)).estimate
        row = measure(engine, artifact, data, Manifest.load(artifact), work)
        row |= {"image_size": args.image_size, "budget": args.budget, "batch_size": args.batch_size,
                "plan_fleet_predicted_mib": round(estimate.peak_bytes / MiB, 1),
                "plan_predicted_without_fleet_mib": round(_without_fleet(estimate) / MiB, 1)}  # fmt: skip
        rows.append(row)
    RESULTS.mkdir(exist_ok=True)
    table_file = io.StringIO()
    writer = csv.DictWriter(table_file, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(RESULTS / "fleet-memory.csv", table_file.getvalue())
    write_json(RESULTS / "fleet-memory.json", rows)
    print(table(rows, args))


def measure(engine: str, artifact: Path, data: Path, manifest: Manifest, work: Path) -> dict:
    fleet = Fleet(work / f"fleet-{engine}")
    out = fleet.root / "out"
    try:
        with PeakWatcher(fleet, ["node"]) as watcher:
            fleet.server(artifact, out, "--rounds", "2", "--min-clients", "1", "--round-timeout", "600")
            fleet.node("node", artifact, data, "--engine", engine)
            assert fleet.wait_exit("server", 1800) == 0, fleet.logs()
    finally:
        fleet.close()
    reported = max(c["peak_rss_bytes"] for r in RunFolder(out).records()[1:] for c in r["clients"])
    initial = RunFolder(out).state_path(0)  # the artifact's trainable tensors, as the server sent them
    alone = subprocess.run(
        [sys.executable, "-c", ALONE, str(artifact), str(data), str(work / f"alone-{engine}"), engine,
         manifest.artifact_sha256, str(initial)],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    solo = json.loads(alone.stdout.splitlines()[-1])
    assert not solo["flwr"], "train_round alone imported Flower"
    peaks = watcher.peaks["node"]
    clientapp = max(peaks["clientapp"], reported)
    with np.load(initial) as saved:
        state_bytes = sum(saved[name].nbytes for name in saved.files)
    return {
        "engine": engine,
        "supernode_mib": round(peaks["supernode"] / MiB, 1),
        "superexec_mib": round(peaks["superexec"] / MiB, 1),
        "clientapp_mib": round(clientapp / MiB, 1),
        "train_round_alone_mib": round(solo["peak"] / MiB, 1),
        "flower_in_clientapp_mib": round((clientapp - solo["peak"]) / MiB, 1),
        "device_total_mib": round((peaks["supernode"] + peaks["superexec"] + clientapp) / MiB, 1),
        "trainable_state_mib": round(state_bytes / MiB, 2),
    }


def _without_fleet(estimate: MemoryEstimate) -> int:
    """The prediction without Flower's parts (``plan`` without ``--fleet``)."""
    return MemoryEstimate(estimate.engine, [p for p in estimate.parts if not p.name.startswith("fleet:")]).peak_bytes


def table(rows: list[dict], args: argparse.Namespace) -> str:
    head = (
        f"EfficientNet-Lite0 {args.image_size} px, trady {args.budget}, batch {args.batch_size}, "
        f"{args.per_class} images/class on the node; VmHWM in MiB\n"
    )
    columns = ["engine", "supernode_mib", "superexec_mib", "clientapp_mib", "train_round_alone_mib",
               "flower_in_clientapp_mib", "device_total_mib", "trainable_state_mib",
               "plan_fleet_predicted_mib", "plan_predicted_without_fleet_mib"]  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    return head + "\n".join(lines)


if __name__ == "__main__":
    main()
