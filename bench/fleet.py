"""Fleet fine-tuning against centralized TraDy, and its uplink against full-model FedAvg.

EfficientNet-Lite0 (ImageNet-pretrained) on Fashion-MNIST, trady at the budget below, the portable
engine (plain onnxruntime; ``--engine torch-sparse`` for the torch one) on every node. A fleet of
real Flower processes on 127.0.0.1 (a SuperLink and one SuperNode per node) trains ROUNDS rounds of
one local epoch on IID and on label-skewed (Dirichlet alpha) disjoint partitions; the centralized run
(``edge-trady run`` on the same artifact, or ``edge-trady finetune --plan`` for torch-sparse) trains
as many epochs on the union of the nodes' training images, with the same plan (lr, schedule, seed).
Accuracy: the same test images (Fashion-MNIST t10k, VAL_PER_CLASS per class) after every round /
epoch (``--evaluate-on held-out``: the nodes' held-out training images instead, to choose the lr).
Bytes: what each node's reply carried (Flower ``ArrayRecord.count_bytes``) against a full-model
FedAvg reply (the model's ``state_dict`` as one ArrayRecord, what Flower's PyTorch examples send).

    nice -n 10 python bench/fleet.py --image-size 32 --per-class 100 --rounds 6 --seeds 0 1 2

Writes bench/results/NAME.csv (one row per setting and round), NAME.json (summary), NAME.png and
NAME.md (the command and the table); NAME is ``fleet`` unless ``--name``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import tempfile
from pathlib import Path

import numpy as np
from benchlib import RESULTS, cli
from fleetlib import Fleet, make_artifact

from edge_trady.core.atomic import replacing, write_json, write_text
from edge_trady.core.plan import Plan
from edge_trady.device.data import IMAGENET, load_dataset
from edge_trady.device.runlog import read_jsonl
from edge_trady.fleet.aggregate import AGGREGATIONS, UPDATERS
from edge_trady.fleet.partition import write_partitions
from edge_trady.fleet.state import RunFolder

MiB = 2**20
SERVER_RESTARTS = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-epochs", type=int, default=1, help="per round (centralized: rounds x this epochs)")
    parser.add_argument("--skews", nargs="+", choices=["iid", "labels"], default=["iid", "labels"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="plan and partition seeds, one run each")
    parser.add_argument("--name", default="fleet", help="results: bench/results/NAME.{csv,json,png,md}")
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--per-class", type=int, default=60, help="images per class, split across the nodes")
    parser.add_argument("--budget", default="2%")
    parser.add_argument("--batch-size", type=int, default=32)
    # The fleet's lr (and the centralized run's, unless --central-lr). Which lr suits which
    # aggregation rule and data size: docs/fleet.md, "Benchmark" (chosen with --evaluate-on held-out).
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--central-lr", type=float, default=None,
                        help="the centralized run's own lr (its own plan, same seed). Default: --lr")  # fmt: skip
    parser.add_argument("--aggregation", choices=AGGREGATIONS, default=UPDATERS,
                        help="the server's (edge-trady fleet server --aggregation)")  # fmt: skip
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the label skew")
    parser.add_argument("--val-per-class", type=int, default=100, help="test images per class (--evaluate-on test)")
    parser.add_argument("--evaluate-on", choices=["test", "held-out"], default="test",
                        help="score every round on the test images, or on the nodes' held-out training images "
                        "(each node's validation split, never trained on): to choose a learning rate")  # fmt: skip
    parser.add_argument("--engine", choices=["portable", "torch-sparse"], default="portable", help="of every run")
    parser.add_argument("--work", type=Path, default=None, help="keep the runs here (default: a temp folder)")
    parser.add_argument("--in-process", action="store_true",
                        help="replay the fleet's rounds in this process (each node's train_round, then the "
                        "server's aggregate; no Flower processes): the same accuracies, for lr sweeps")  # fmt: skip
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    rows, summary = [], {"settings": vars(args) | {"work": str(work)}, "fleets": {}}
    for seed in args.seeds:
        rows += run_seed(work / f"seed-{seed}", seed, args, summary["fleets"])
    plan = Plan.load(work / f"seed-{args.seeds[0]}" / "plan-portable.json")
    summary |= results(rows, full_model_bytes(plan), args)
    RESULTS.mkdir(exist_ok=True)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(RESULTS / f"{args.name}.csv", table.getvalue())
    write_json(RESULTS / f"{args.name}.json", summary)
    plot(rows, summary, RESULTS / f"{args.name}.png")
    write_text(RESULTS / f"{args.name}.md", markdown(summary))
    print(report(summary))


def run_seed(work: Path, seed: int, args: argparse.Namespace, fleets: dict) -> list[dict]:
    """One seed (the plan's: classifier initialisation, channel draws, batch order; and the
    partitions'): the fleets of every skew and the centralized run, as rows."""
    artifact = make_artifact(work, args.image_size, args.budget, args.batch_size, args.lr, seed=seed)
    rows = []
    for skew in args.skews:
        parts = write_partitions("fashion-mnist", args.nodes, work / f"parts-{skew}", args.image_size, skew,
                                 args.per_class, args.alpha, seed)  # fmt: skip
        if skew == args.skews[0]:  # the centralized data; its x_val: the held-out images (--evaluate-on)
            union = union_data(work / f"parts-{skew}", args.nodes, args.image_size, work / "union.npz")
        fleet = replay_fleet if args.in_process else run_fleet
        folder = work / "-".join([f"fleet-{skew}", *([args.aggregation] if args.aggregation != UPDATERS else []),
                                  *(["in-process"] if args.in_process else [])])  # fmt: skip
        records, restarts = fleet(folder, artifact, [p.path for p in parts], union, args)
        fleets[f"{skew}-seed-{seed}"] = {"per_node_per_class": [p.per_class for p in parts],
                                         "server_restarts": restarts,
                                         "round_attempts": [r.get("attempt", 1) for r in records[1:]]}  # fmt: skip
        for record in records:
            clients = record.get("clients", [])
            rows.append({
                "seed": seed, "setting": f"fleet-{skew}", "round": record["round"], "val_acc": record["val_acc"],
                "uplink_bytes_per_client": int(np.mean([c["uplink_bytes"] for c in clients])) if clients else 0,
                "downlink_bytes_per_client": record.get("downlink_bytes", 0),
                "entries_updated": record.get("touched_entries", 0), "clients": len(clients),
            })  # fmt: skip
    central, central_artifact = work / "central", artifact
    if args.central_lr not in (None, args.lr):  # the same plan (seed, draws, order) at its own lr
        own = work / f"central-lr{args.central_lr:g}"
        central, central_artifact = (
            own / "run",
            make_artifact(own, args.image_size, args.budget, args.batch_size, args.central_lr, seed=seed),
        )
    for epoch in centralized(central, central_artifact, union, args):
        rows.append({"seed": seed, "setting": "centralized", "round": epoch["epoch"] // args.local_epochs,
                     "val_acc": epoch["val_acc"], "uplink_bytes_per_client": 0, "downlink_bytes_per_client": 0,
                     "entries_updated": 0, "clients": 1})  # fmt: skip
    return rows


def val_spec(union: Path, args: argparse.Namespace) -> list[str]:
    """What the server and the centralized run score on (the value of ``--val`` and its options):
    test images, or the held-out ones (``union``'s validation part)."""
    if args.evaluate_on == "held-out":
        return [str(union)]
    return ["fashion-mnist", "--val-per-class", str(args.val_per_class)]


def run_fleet(
    root: Path, artifact: Path, parts: list[Path], val: Path, args: argparse.Namespace
) -> tuple[list[dict], int]:
    """The fleet's round records and how often its server was restarted: on a loaded machine the
    SuperLink's SQLite database can stay locked long enough to fail a run; the server is then started
    again on the same run folder and continues after its last saved round (the nodes stay up)."""
    out = root / "out"
    folder = RunFolder(out)
    if folder.status().get("state") == "finished":  # done by an earlier call with the same --work
        return folder.records(), 0
    fleet = Fleet(root)
    options = ["--rounds", str(args.rounds), "--local-epochs", str(args.local_epochs), "--min-clients",
               str(args.nodes), "--wait-for", str(args.nodes), "--val", *val_spec(val, args), "--round-timeout", "1800",
               "--wait-timeout", "600", "--aggregation", args.aggregation]  # fmt: skip
    try:
        for restart in range(SERVER_RESTARTS + 1):
            label = f"server-{restart}"
            fleet.server(artifact, out, *options, label=label)
            if restart == 0:
                for index, data in enumerate(parts):
                    fleet.node(f"node{index}", artifact, data, "--engine", args.engine)
            if fleet.wait_exit(label, 4 * 3600) == 0:
                return folder.records(), restart
            print(f"{root.name}: the server stopped after round {folder.last_round()}; starting it again", flush=True)
        raise AssertionError(f"{root.name}: the server failed {SERVER_RESTARTS + 1} times\n{fleet.logs()}")
    finally:
        fleet.close()


def replay_fleet(
    root: Path, artifact: Path, parts: list[Path], val: Path, args: argparse.Namespace
) -> tuple[list[dict], int]:
    """``run_fleet``'s round records from the same code without Flower: every node's
    ``client.train_round`` (same names, hence seeds and selections) on the round's global state,
    one after the other, then ``aggregate``; the server's evaluation. No faults, no restarts."""
    from edge_trady.fleet.aggregate import aggregate
    from edge_trady.fleet.client import NodeSettings, train_round
    from edge_trady.fleet.protocol import encode_state, encode_update
    from edge_trady.fleet.server import FleetConfig, FleetServer
    from edge_trady.fleet.task import RoundTask

    spec = val_spec(val, args)
    config = FleetConfig(
        artifact=str(artifact.resolve()), out=str((root / "out").resolve()), rounds=args.rounds,
        local_epochs=args.local_epochs, min_clients=args.nodes, aggregation=args.aggregation, val=spec[0],
        val_per_class=args.val_per_class if len(spec) > 1 else 0,
    )  # fmt: skip
    server = FleetServer(config, log=lambda line: None)
    state = server.engine.trainable_state()
    records = [{"round": 0, **server.evaluate_state(state)}]
    for number in range(1, args.rounds + 1):
        task = RoundTask(number, args.rounds, args.local_epochs, server.manifest.artifact_sha256)
        updates = []
        for index, data in enumerate(parts):
            node = f"node{index}"  # run_fleet's names
            settings = NodeSettings(node, artifact, str(data), root / "nodes" / node, engine=args.engine)
            updates.append(train_round(settings, task, state)[0])
        result = aggregate(state, updates, server.layers, args.aggregation)
        state = result.state
        records.append({
            "round": number, **server.evaluate_state(state),
            "clients": [{"uplink_bytes": encode_update(u).count_bytes()} for u in updates],
            "downlink_bytes": encode_state(state).count_bytes(), "touched_entries": sum(result.touched.values()),
        })  # fmt: skip
        print(f"{root.name}: round {number}/{args.rounds} val_acc {records[-1].get('val_acc', float('nan')):.4f}",
              flush=True)  # fmt: skip
    return records, 0


def union_data(parts: Path, nodes: int, image_size: int, path: Path) -> Path:
    """The nodes' training images together (their local validation images as x_val): what the
    centralized run trains on."""
    splits = {"train": [], "val": []}
    for index in range(nodes):
        for split in splits:
            splits[split].append(load_dataset(str(parts / f"node-{index}.npz"), split, image_size, IMAGENET))
    joined = {split: (np.concatenate([d.pixels for d in sets]), np.concatenate([d.labels for d in sets]))
              for split, sets in splits.items()}  # fmt: skip
    np.savez(path, x=joined["train"][0], y=joined["train"][1], x_val=joined["val"][0], y_val=joined["val"][1],
             class_names=np.array(splits["train"][0].class_names))  # fmt: skip
    return path


def centralized(out: Path, artifact: Path, union: Path, args: argparse.Namespace) -> list[dict]:
    """The same artifact and plan trained on the union, as many epochs as the fleet has rounds:
    ``edge-trady run`` (portable) or ``edge-trady finetune --plan`` (torch-sparse)."""
    if not (out / "summary.json").is_file():
        epochs = str(args.rounds * args.local_epochs)
        val = [*val_spec(union, args), "--epochs", epochs]
        common = ["--per-class", "1000000", "--out", str(out), "--quiet"]
        if args.engine == "portable":
            cli("run", str(artifact), "--train", str(union), "--val", *val, *common)
        else:  # the plan the artifact was exported from (fleetlib.make_artifact)
            plan = artifact.parent / "plan-portable.json"
            cli("finetune", "--plan", str(plan), "--data", str(union), "--engine", "torch-sparse", "--val-data", *val,
                *common)  # fmt: skip
    initial = json.loads((out / "summary.json").read_text())["initial_val_acc"]
    epochs = [{"epoch": 0, "val_acc": initial}, *read_jsonl(out / "metrics.jsonl")]
    return [e for e in epochs if e["epoch"] % args.local_epochs == 0]  # at the fleet's round ends


def full_model_bytes(plan: Plan) -> int:
    """A full-model FedAvg reply: the whole state_dict as one Flower ArrayRecord."""
    from flwr.app import ArrayRecord

    from edge_trady.workstation.models import build_model

    built = build_model(plan.model, plan.num_classes, plan.image_size, plan.seed)
    return ArrayRecord(built.module.state_dict()).count_bytes()


def results(rows: list[dict], full: int, args: argparse.Namespace) -> dict:
    """Final accuracies and gaps to centralized per seed, their means, and the uplink."""
    fleets = [f"fleet-{skew}" for skew in args.skews]
    settings = [*fleets, "centralized"]
    final = {
        s: {seed: next(r["val_acc"] for r in reversed(rows) if r["setting"] == s and r["seed"] == seed)
            for seed in args.seeds}
        for s in settings
    }  # fmt: skip
    gaps = {s: {seed: round(100 * (final["centralized"][seed] - final[s][seed]), 2) for seed in args.seeds}
            for s in fleets}  # fmt: skip
    mean_gap = {s: round(float(np.mean(list(g.values()))), 2) for s, g in gaps.items()}
    uplink = {s: float(np.mean([r["uplink_bytes_per_client"] for r in rows if r["setting"] == s and r["round"]]))
              for s in fleets}  # fmt: skip
    targets = {"uplink >= 20x less": min(full / b for b in uplink.values()) >= 20}
    if "fleet-iid" in mean_gap:
        targets["IID within 2 points of centralized (mean over seeds)"] = mean_gap["fleet-iid"] <= 2
    return {
        "final_val_acc": final,
        "mean_final_val_acc": {s: round(float(np.mean(list(v.values()))), 4) for s, v in final.items()},
        "gap_points": gaps,
        "mean_gap_points": mean_gap,
        "uplink_bytes_per_client_round": uplink,
        "full_model_fedavg_bytes": full,
        "uplink_reduction": {s: round(full / b, 1) for s, b in uplink.items()},
        "targets": targets,
    }


def report(summary: dict) -> str:
    s = summary["settings"]
    seeds = s["seeds"]
    lines = [
        f"EfficientNet-Lite0 {s['image_size']} px, trady {s['budget']}, batch {s['batch_size']}, {lrs(s)}, "
        f"{s['nodes']} nodes, {s['rounds']} rounds x {s['local_epochs']} local epoch(s) "
        f"(centralized: {s['rounds'] * s['local_epochs']} epochs), aggregation '{s['aggregation']}', "
        f"{s['per_class']} images/class in all; "
        f"accuracy on {scored(s)}; seeds {', '.join(map(str, seeds))}",
        "",
        "| setting | " + " | ".join(f"seed {seed}" for seed in seeds) + " | mean | gap to centralized (mean) "
        "| uplink per client per round | vs full-model FedAvg |",
        "|---|" + "---|" * (len(seeds) + 4),
    ]
    full = summary["full_model_fedavg_bytes"]
    for setting, accs in summary["final_val_acc"].items():
        uplink = summary["uplink_bytes_per_client_round"].get(setting)
        sent = f"{uplink / 1024:.1f} KiB" if uplink else "-"
        ratio = f"{full / uplink:.1f}x less" if uplink else "-"
        gap = summary["mean_gap_points"].get(setting)
        cells = [f"{accs[seed]:.4f}" for seed in seeds]
        mean = summary["mean_final_val_acc"][setting]
        gap_cell = f"{gap:+.2f} points" if gap is not None else "-"
        lines.append(f"| {setting} | {' | '.join(cells)} | {mean:.4f} | {gap_cell} | {sent} | {ratio} |")
    lines.append(f"| full-model FedAvg (uplink reference) | {' | '.join('-' for _ in seeds)} | - | - "
                 f"| {full / 1024:.1f} KiB | 1x |")  # fmt: skip
    for setting, gaps in summary["gap_points"].items():
        each = ", ".join(f"seed {seed} {gap:+.2f}" for seed, gap in gaps.items())
        lines.append(f"\n{setting} below centralized: mean {summary['mean_gap_points'][setting]:+.2f} points ({each})")
    lines += ["", f"targets: {summary['targets']}"]
    return "\n".join(lines)


def lrs(settings: dict) -> str:
    """The learning rate(s) of a run, for its report."""
    central = settings.get("central_lr")
    if central in (None, settings["lr"]):
        return f"lr {settings['lr']} (fleet and centralized)"
    return f"lr {settings['lr']} (fleet), {central} (centralized)"


def scored(settings: dict) -> str:
    """What the accuracies were measured on."""
    if settings.get("evaluate_on") == "held-out":
        return "the nodes' held-out training images (validation splits; for choosing the lr, not test images)"
    return f"{10 * settings['val_per_class']} Fashion-MNIST test images"


def command_line(settings: dict) -> str:
    """The command that reproduces a summary's settings."""
    defaults = {"nodes": 4, "budget": "2%", "batch_size": 32, "alpha": 0.5, "engine": "portable", "local_epochs": 1,
                "skews": ["iid", "labels"], "seeds": [0], "name": "fleet", "aggregation": UPDATERS,
                "evaluate_on": "test", "central_lr": None, "in_process": False}  # fmt: skip
    keys = ["image_size", "per_class", "rounds", "val_per_class", "lr", *defaults]
    value = {k: " ".join(map(str, v)) if isinstance(v, list) else v for k, v in settings.items()}
    changed = [k for k in keys if settings.get(k, defaults.get(k)) != defaults.get(k)]
    args = [f"--{k.replace('_', '-')}" + ("" if value[k] is True else f" {value[k]}") for k in changed]
    return "nice -n 10 python bench/fleet.py " + " ".join(args)


def markdown(summary: dict) -> str:
    """bench/results/NAME.md: the command, the table and where the per-round rows are."""
    name = summary["settings"]["name"]
    return (
        f"# Fleet benchmark\n\n```\n{command_line(summary['settings'])}\n```\n\n{report(summary)}\n\n"
        f"Per round and seed: {name}.csv; summary: {name}.json; plot: {name}.png.\n"
    )


def plot(rows: list[dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 2]})
    epochs = summary["settings"]["local_epochs"]
    labels = {"centralized": f"centralized TraDy ({epochs} epoch(s) per point)", "fleet-iid": "fleet, IID (round)",
              "fleet-labels": f"fleet, label-skewed a={summary['settings']['alpha']} (round)"}  # fmt: skip
    labels = {s: label for s, label in labels.items() if s in summary["final_val_acc"]}
    seeds = summary["settings"]["seeds"]
    for color, (setting, label) in enumerate(labels.items()):
        curves = np.array([[r["val_acc"] for r in rows if r["setting"] == setting and r["seed"] == seed]
                           for seed in seeds])  # fmt: skip
        rounds = sorted({r["round"] for r in rows if r["setting"] == setting})
        left.plot(rounds, curves.mean(0), marker="o", color=f"C{color}", label=f"{label}, mean of {len(seeds)}")
        if len(seeds) > 1:
            left.fill_between(rounds, curves.min(0), curves.max(0), color=f"C{color}", alpha=0.2)
    left.set_xlabel("round")
    left.set_ylabel("held-out accuracy" if summary["settings"]["evaluate_on"] == "held-out" else "test accuracy")
    left.grid(alpha=0.3)
    left.legend()
    uplink = summary["uplink_bytes_per_client_round"]
    names = ["full-model\nFedAvg", *(s.replace("fleet-", "fleet ") for s in uplink)]
    values = [summary["full_model_fedavg_bytes"], *uplink.values()]
    right.bar(names, [v / MiB for v in values], color=["grey", "C1", "C2"][: len(values)])
    right.set_yscale("log")
    right.set_ylabel("uplink per client per round (MiB, log)")
    for x, v in enumerate(values):
        right.text(x, v / MiB, f"{v / 1024:.0f} KiB", ha="center", va="bottom")
    figure.tight_layout()
    with replacing(path) as tmp:
        figure.savefig(tmp, dpi=90, format="png")


if __name__ == "__main__":
    main()
