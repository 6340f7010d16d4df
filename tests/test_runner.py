"""Device path: export -> run (torch unimportable) -> evaluate; parity with finetune, guards, resume;
for both artifact formats (onnx: the portable engine; ort-training: ONNX Runtime training).

The model is MobileNetV2-w0.35 at 32 px with its BatchNorm statistics calibrated on noise: the plain
random initialisation shrinks activations ~1e-8 by the classifier, so nothing but the classifier
bias would train and every comparison below would hold trivially.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from edge_trady.cli import cli
from edge_trady.core.layers import LayerCost
from edge_trady.core.masks import channel_mask
from edge_trady.device.data import MINUS_ONE_TO_ONE, load_dataset
from edge_trady.device.manifest import FORMAT_VERSION, MANIFEST_FILE, Manifest, hash_files
from edge_trady.device.runlog import read_jsonl
from edge_trady.device.runner import RunRequest, load_data, open_engine
from edge_trady.engines.ort_training import OrtEngine
from edge_trady.engines.portable_format import PortableLayout
from edge_trady.errors import ArtifactError
from edge_trady.workstation.cost_trace import trace_layers
from edge_trady.workstation.models import build_model
from edge_trady.workstation.ranking import build_ranking

FACTORY = '''
import torch
from torch import nn

from edge_trady.workstation.mobilenetv2 import MobileNetV2


def mobilenet(num_classes):
    """MobileNetV2-w0.35 whose BatchNorm statistics are those of noise at 32 px."""
    model = MobileNetV2(num_classes, width=0.35)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(64, 3, 32, 32))
    return model.eval()
'''
# Found first on PYTHONPATH by the device processes: importing torch fails and leaves a trace.
TORCH_BLOCKER = """
import os
with open(os.environ["EDGE_TRADY_TEST_TORCH_IMPORTS"], "a") as log:
    log.write("torch imported\\n")
raise ImportError("torch is not installed on this (simulated) device")
"""
TRAIN = ["--train", "synthetic:4"]
DATA = ["--data", "synthetic:4"]
ENGINE_OF_FORMAT = {"onnx": "portable", "ort-training": "ort"}
REPO = Path(__file__).resolve().parents[1]
DEVICE_VENV = REPO / ".venv-device" / "bin" / "python"


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module", params=list(ENGINE_OF_FORMAT))
def fmt(request) -> str:
    """The artifact format every test of this module runs with."""
    return request.param


@pytest.fixture(scope="module")
def root(tmp_path_factory, fmt: str) -> Path:
    return tmp_path_factory.mktemp(f"runner-{fmt}")


@pytest.fixture(scope="module")
def plan_path(root: Path, fmt: str) -> Path:
    """A trady plan over the last 20 layers (a ranking written here: no ranking epoch)."""
    (root / "calibrated.py").write_text(FACTORY)
    model = f"{root / 'calibrated.py'}:mobilenet"
    built = build_model(model, 4, 32, trust_code=True)
    names = [layer.name for layer in trace_layers(built.module, 32) if layer.name != built.classifier]
    scores = dict.fromkeys(names[-20:], 1.0)
    build_ranking(model, 32, scores, scores, threshold=1.0).save(root / "ranking.json")
    path = root / "plan.json"
    _invoke(
        "plan",
        "--model",
        model,
        "--trust-model-code",
        "--image-size",
        "32",
        "--profile",
        "this-workstation",
        "--engine",
        ENGINE_OF_FORMAT[fmt],
        "--budget",
        "5%",
        "--data",
        "synthetic:4",
        "--per-class",
        "48",
        "--batch-size",
        "16",
        "--epochs",
        "3",
        "--lr",
        "0.01",
        "--ranking",
        str(root / "ranking.json"),
        "-o",
        str(path),
        "--quiet",
    )
    return path


@pytest.fixture(scope="module")
def artifact(root: Path, plan_path: Path) -> Path:
    _invoke("export", str(plan_path), "-o", str(root / "artifact"), "--trust-model-code", "--quiet")
    return root / "artifact"


@pytest.fixture(scope="module")
def device(root: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Runs ``edge-trady ARGS`` in a process where torch cannot be imported; checks it was not tried."""
    (root / "blocked" / "torch").mkdir(parents=True)
    (root / "blocked" / "torch" / "__init__.py").write_text(TORCH_BLOCKER)
    attempts = root / "torch-imports.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root / "blocked"), os.environ.get("PYTHONPATH")])),
        "EDGE_TRADY_TEST_TORCH_IMPORTS": str(attempts),
    }

    def run(*args: str, wait: bool = True):
        command = [sys.executable, "-m", "edge_trady", *args]
        if not wait:
            return subprocess.Popen(command, env=env)
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert not attempts.exists(), f"the device side imported torch: edge-trady {' '.join(args)}"
        return done

    return run


def _run_args(artifact: Path, out: Path) -> list[str]:
    return ["run", str(artifact), *TRAIN, "--per-class", "48", "--checkpoint-every", "2", "--out", str(out)]


@pytest.fixture(scope="module")
def trained(root: Path, artifact: Path, device) -> Path:
    """The plan's 3 epochs of 12 steps on the device (torch blocked)."""
    out = root / "run"
    done = device(*_run_args(artifact, out), "--quiet")
    assert done.returncode == 0, done.stderr
    return out


def _initializers(model: Path) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in onnx.load(model).graph.initializer}


def _initial_parameters(artifact: Path) -> dict[str, np.ndarray]:
    """Every parameter of the artifact's model before training, trained or frozen."""
    if Manifest.load(artifact).format == "onnx":
        return _initializers(artifact / PortableLayout.load(artifact).inference_model)
    engine = OrtEngine(artifact)
    return {name: engine.parameter(name) for name in engine.parameter_names()}


def _trained_parameters(artifact: Path) -> tuple[list[str], dict[str, LayerCost]]:
    """The classifier's parameters, and the candidate layers' weights with their layer."""
    if Manifest.load(artifact).format == "onnx":
        layout = PortableLayout.load(artifact)
        layers = {layer.name: layer for layer in layout.layers}
        return [w for w in layout.weights if w not in layout.layer_of], {
            w: layers[n] for w, n in layout.layer_of.items()
        }
    layout = OrtEngine(artifact).layout
    return layout.params[layout.classifier], {f"{layer.name}.weight": layer for layer in layout.layers}


def test_manifest_describes_and_verifies_the_artifact(artifact: Path, plan_path: Path) -> None:
    manifest = Manifest.load(artifact)
    assert Manifest.from_dict(manifest.to_dict()) == manifest
    assert manifest.format_version == FORMAT_VERSION
    assert manifest.to_dict()["plan"] == json.loads(plan_path.read_text())
    assert set(manifest.files) == {p.name for p in artifact.iterdir()} - {MANIFEST_FILE}
    assert set(manifest.versions) == {"edge-trady", "torch", "onnx", "onnxruntime", "numpy"}
    assert manifest.class_names == ["class0", "class1", "class2", "class3"]
    assert manifest.input == {
        "name": "input",
        "image_size": 32,
        "channels": 3,
        "dtype": "float32",
        "layout": "NCHW",
    }
    if manifest.format == "onnx":
        layout = PortableLayout.load(artifact)
        inputs = {name: layer for layer, name in layout.channel_inputs.items()}
    else:
        inputs = OrtEngine(artifact).layout.masks
    assert {name: entry["layer"] for name, entry in manifest.selection_inputs.items()} == inputs
    assert [layer["name"] for layer in manifest.plan.layers] == list(inputs.values())
    broken = manifest.to_dict()
    del broken["files"]
    with pytest.raises(ArtifactError, match=r"missing fields \['files'\]"):
        Manifest.from_dict(broken)


def test_run_on_the_device_never_imports_torch(trained: Path, artifact: Path, plan_path: Path, fmt: str) -> None:
    metrics, selections = read_jsonl(trained / "metrics.jsonl"), read_jsonl(trained / "selection.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    engine = ENGINE_OF_FORMAT[fmt]
    assert all(m["engine"] == engine and 0 < m["units_used"] <= m["budget_units"] for m in metrics)
    assert len({json.dumps(s["channels"], sort_keys=True) for s in selections}) == 3  # redrawn each epoch
    candidates = {layer["name"] for layer in json.loads(plan_path.read_text())["layers"]}
    assert all(set(s["channels"]) <= candidates for s in selections)
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["final_val_acc"] == metrics[-1]["val_acc"] > 0.4  # 4 classes: it learned something
    assert summary["peak_rss_bytes"] > 0 and summary["predicted_peak_bytes"] > 0
    info = json.loads((trained / "model.json").read_text())
    assert info["artifact_sha256"] == Manifest.load(artifact).artifact_sha256 == summary["artifact_sha256"]
    assert (trained / "model.onnx").is_file()


def test_threads_reach_the_engine(artifact: Path, fmt: str) -> None:
    engine = open_engine(Manifest.load(artifact), artifact, threads=3)
    threads = engine.threads if fmt == "onnx" else engine._options.intra_op_num_threads
    assert threads == 3


def test_evaluate_reports_the_runs_last_val_accuracy(trained: Path, device) -> None:
    done = device("evaluate", str(trained / "model.onnx"), "--data", "synthetic:4", "--per-class", "48", "--verbose")
    assert done.returncode == 0, done.stderr
    correct, total = map(int, re.search(r"accuracy \S+ \((\d+)/(\d+)\) loss", done.stdout).groups())
    assert correct / total == read_jsonl(trained / "metrics.jsonl")[-1]["val_acc"]
    assert len(done.stdout.splitlines()) == 1 + 4  # and one line per class


def test_evaluate_scores_a_whole_test_file_unless_a_split_is_asked(
    trained: Path, artifact: Path, device, tmp_path: Path
) -> None:
    test_file = tmp_path / "test.npz"
    images = load_dataset("synthetic:4", "all", 32, MINUS_ONE_TO_ONE, seed=9)  # 2 x 32 per class
    np.savez(test_file, x=images.pixels, y=images.labels, class_names=images.class_names)
    model = str(trained / "model.onnx")
    counts = {}
    for split in ([], ["--split", "val"], ["--split", "train"], ["--split", "all"]):
        done = device("evaluate", model, "--data", str(test_file), *split)
        assert done.returncode == 0, done.stderr
        total, scored, source = re.search(r"\(\d+/(\d+)\) loss \S+ on (\d+) images of (.*)$", done.stdout).groups()
        assert total == scored
        counts[tuple(split)] = int(scored), source
    assert counts[()] == counts[("--split", "all")] == (256, f"{test_file} (all)")
    assert counts[("--split", "val")] == (52, f"{test_file} (val, 0.2 holdout, seed 0)")
    assert counts[("--split", "train")][0] == 256 - 52
    # --val of run: the same rule (a separate file is validation data whole; the training data's holdout else)
    manifest = Manifest.load(artifact)
    _, val = load_data(manifest, RunRequest(artifact, "synthetic:4", tmp_path / "run", val=str(test_file)))
    assert len(val) == 256 and val.source == f"{test_file} (all)"
    _, val = load_data(manifest, RunRequest(artifact, str(test_file), tmp_path / "run"))
    assert len(val) == 52


def test_report_of_a_device_run_knows_its_predicted_peak(trained: Path, artifact: Path, device, fmt: str) -> None:
    done = device("report", str(trained), "--plan", str(artifact))
    assert done.returncode == 0, done.stderr
    summary = json.loads((trained / "summary.json").read_text())
    predicted = summary["predicted_peak_bytes"] / 2**20
    engine = ENGINE_OF_FORMAT[fmt]
    assert done.stdout.startswith(f"{trained}: {summary['model']}, edge-trady run, engine {engine}, method trady\n")
    assert f"(predicted {predicted:.1f} MiB, " in done.stdout and (trained / "report.png").is_file()
    assert "of 20 layers trained at least once" in done.stdout  # the plan's 20 candidates


def test_unselected_channels_and_frozen_weights_stay_bit_identical(artifact: Path, trained: Path) -> None:
    initial = _initial_parameters(artifact)
    classifier, masked = _trained_parameters(artifact)
    final = _initializers(trained / "model.onnx")
    selected: dict[str, set[int]] = {}
    for selection in read_jsonl(trained / "selection.jsonl"):
        for layer, channels in selection["channels"].items():
            selected.setdefault(layer, set()).update(channels)
    changed = 0
    for name, before in initial.items():
        after = final[name]
        if name in classifier:
            assert not np.array_equal(after, before), name  # the classifier always trains
        elif name in masked:
            layer = masked[name]
            never = sorted(set(range(layer.in_channels)) - selected.get(layer.name, set()))
            kept = np.broadcast_to(channel_mask(layer, np.array(never, dtype=np.int64)) == 1, before.shape)
            assert np.array_equal(after[kept], before[kept]), name
            changed += not np.array_equal(after, before)
        else:
            assert np.array_equal(after, before), name  # frozen (BN-folded in both)
    assert changed >= len(masked) // 2


def test_runner_matches_finetune(artifact: Path, plan_path: Path, tmp_path: Path, fmt: str) -> None:
    """Same plan, seed, data, order and selections as 'finetune' with the reference engine (torch-masked
    for ort-training, torch-sparse for onnx); one step per epoch (16 images, batch 16).

    Weights are compared after one step: later, fp32 ReLU6 gradients flip where a pre-activation is
    within rounding of 0 (torch fp32 and fp64 disagree there too) and the trajectories drift apart
    by a few % of the weights' movement, while the losses still agree to ~1e-4. (Several steps equal
    to 1e-4 where no mask flips: tests/test_portable.py.)"""
    reference_engine = "torch-sparse" if fmt == "onnx" else "torch-masked"
    per_class = "4"

    def small(epochs: str) -> list[str]:
        return ["--per-class", per_class, "--epochs", epochs, "--quiet"]

    for epochs in ("1", "3"):
        _invoke("run", str(artifact), *TRAIN, "--out", str(tmp_path / f"ort{epochs}"), *small(epochs))
        _invoke(
            "finetune",
            "--plan",
            str(plan_path),
            "--trust-model-code",
            *DATA,
            "--engine",
            reference_engine,
            "--out",
            str(tmp_path / f"torch{epochs}"),
            *small(epochs),
        )
    # finetune --plan with the plan's engine exports the same artifact and trains it alike
    ft_ort = ["finetune", "--plan", str(plan_path), "--trust-model-code", *DATA, "--out", str(tmp_path / "ft-ort1")]
    _invoke(*ft_ort, *small("1"))
    _assert_same_run(tmp_path / "ort1", tmp_path / "ft-ort1")
    ort, ref = (read_jsonl(tmp_path / f"{engine}3" / "metrics.jsonl") for engine in ("ort", "torch"))
    same = ("images", "lr", "units_used", "budget_units", "channels_per_layer")
    assert [{k: m[k] for k in same} for m in ort] == [{k: m[k] for k in same} for m in ref]
    assert ort[0]["train_loss"] == pytest.approx(ref[0]["train_loss"], rel=1e-4)
    assert [m["train_loss"] for m in ort] == pytest.approx([m["train_loss"] for m in ref], rel=1e-3)
    assert read_jsonl(tmp_path / "ort3" / "selection.jsonl") == read_jsonl(tmp_path / "torch3" / "selection.jsonl")
    initial = _initial_parameters(artifact)
    classifier, masked = _trained_parameters(artifact)
    trained = _initializers(tmp_path / "ort1" / "model.onnx")
    reference = torch.load(tmp_path / "torch1" / "model.pt", weights_only=True)
    for name in [*classifier, *masked]:
        moved = np.linalg.norm(reference[name].numpy() - initial[name])
        assert moved > 0, name
        assert np.linalg.norm(trained[name] - reference[name].numpy()) <= 1e-3 * moved, name


def _assert_same_run(a: Path, b: Path) -> None:
    """Same final weights (bit for bit), selections and losses."""
    first, second = _initializers(a / "model.onnx"), _initializers(b / "model.onnx")
    assert first.keys() == second.keys()
    assert all(np.array_equal(first[k], second[k]) for k in first)
    assert read_jsonl(a / "selection.jsonl") == read_jsonl(b / "selection.jsonl")
    losses = [[m["train_loss"] for m in read_jsonl(run / "metrics.jsonl")] for run in (a, b)]
    assert losses[0] == losses[1]


def _start_and_wait(device, args: list[str], out: Path, ready: Callable[[str], bool]) -> subprocess.Popen:
    """Start a run; return once the name of its latest checkpoint satisfies ``ready``."""
    proc = device(*args, "--quiet", wait=False)
    latest = out / "checkpoints" / "LATEST"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.exists() and ready(latest.read_text()):
            return proc
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"no checkpoint as expected in {out}")


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(
    artifact: Path, trained: Path, device, tmp_path: Path
) -> None:
    out = tmp_path / "killed"
    args = _run_args(artifact, out)

    def mid_second_epoch(name: str) -> bool:
        return name.startswith("epoch0001-step") and not name.endswith("step000000")

    proc = _start_and_wait(device, args, out, mid_second_epoch)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoints" / "LATEST").read_text().startswith("epoch0001-step")  # killed in epoch 2
    resumed = device(*args, "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(trained, out)
    report = device("report", str(out))  # the report says where the run resumed
    assert report.returncode == 0, report.stderr
    assert "  epochs     3 epoch(s) (resumed at epoch 2)," in report.stdout


def test_sigterm_checkpoints_and_stops_then_resume_finishes(
    artifact: Path, trained: Path, device, tmp_path: Path
) -> None:
    out = tmp_path / "stopped"
    args = _run_args(artifact, out)
    proc = _start_and_wait(device, args, out, lambda name: name.startswith("epoch0000-step"))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    assert len(read_jsonl(out / "metrics.jsonl")) < 3  # stopped early, with a checkpoint
    resumed = device(*args, "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(trained, out)


def _edit_manifest(artifact: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads((artifact / MANIFEST_FILE).read_text())
    edit(data)
    (artifact / MANIFEST_FILE).write_text(json.dumps(data))


def _truncate(name: str) -> Callable[[Path], None]:
    def truncate(artifact: Path) -> None:
        path = artifact / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return truncate


def _flip_byte(name: str) -> Callable[[Path], None]:
    def flip(artifact: Path) -> None:
        path = artifact / name
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))

    return flip


def _replace_graph(artifact: Path) -> None:
    """The step graph replaced by another graph, with hashes to match (a hand-made artifact)."""
    shutil.copy(artifact / "inference.onnx", artifact / "train_step.onnx")
    _edit_manifest(artifact, lambda d: d.update(files=hash_files(artifact)))


def _widen_first_layer(data: dict) -> None:
    data["plan"]["layers"][0]["in_channels"] += 8  # the sampler would draw channels the graph lacks


BROKEN = {
    "missing dir": (shutil.rmtree, "no such artifact directory"),
    "other version": (
        lambda a: _edit_manifest(a, lambda d: d.update(format_version=FORMAT_VERSION + 1)),
        f"manifest format version {FORMAT_VERSION + 1}, this edge-trady reads version {FORMAT_VERSION} "
        "(the artifact was written by a newer edge-trady): upgrade edge-trady or export it again with this one",
    ),
    "older version": (
        lambda a: _edit_manifest(a, lambda d: d.update(format_version=1)),
        "manifest format version 1, this edge-trady reads version 2 (the artifact was written by an older",
    ),
    "rgn oracle": (
        lambda a: _edit_manifest(a, lambda d: d["plan"].update(method="d-det-rgn")),
        "method 'd-det-rgn' is an RGN oracle",
    ),
    "selection out of range": (
        lambda a: _edit_manifest(a, _widen_first_layer),
        "the plan in its manifest does not match its graph (layer ",
    ),
}
BROKEN_BY_FORMAT = {
    "ort-training": {
        "truncated": (_truncate("checkpoint"), "checkpoint: content does not match the manifest (truncated or edited)"),
        "edited": (
            _flip_byte("training_model.onnx"),
            "training_model.onnx: content does not match the manifest (truncated or edited)",
        ),
        "missing file": (lambda a: (a / "layout.json").unlink(), "layout.json: missing from the artifact"),
    },
    "onnx": {
        "truncated": (
            _truncate("train_step.onnx"),
            "train_step.onnx: content does not match the manifest (truncated or edited)",
        ),
        "edited": (
            _flip_byte("inference.onnx"),
            "inference.onnx: content does not match the manifest (truncated or edited)",
        ),
        "missing file": (lambda a: (a / "portable.json").unlink(), "portable.json: missing from the artifact"),
        "replaced graph": (_replace_graph, "its inputs and outputs are not the ones portable.json names"),
    },
}


@pytest.mark.parametrize("case", [*BROKEN, "truncated", "edited", "missing file", "replaced graph", "wrong classes"])
def test_broken_artifact_or_data_is_one_clear_line(artifact: Path, device, tmp_path: Path, case: str, fmt: str) -> None:
    """One error line, exit status 2, nothing written to the run folder."""
    breakers = {**BROKEN, **BROKEN_BY_FORMAT[fmt]}
    if case not in breakers and case != "wrong classes":
        pytest.skip(f"not a {fmt} artifact case")
    copy = tmp_path / "artifact"
    shutil.copytree(artifact, copy)
    data, expected = "synthetic:4", "synthetic:3 (train, 4 per class, seed 0): 3 classes, the model has 4"
    if case in breakers:
        breaker, expected = breakers[case]
        breaker(copy)
    else:
        data = "synthetic:3"
    out = tmp_path / "out"
    done = device("run", str(copy), "--train", data, "--per-class", "4", "--out", str(out))
    assert done.returncode == 2
    assert done.stderr.startswith("error:") and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert expected in done.stderr
    assert not out.exists() or not any(out.iterdir())


def test_too_old_onnxruntime_is_one_clear_line(artifact: Path, fmt: str, tmp_path: Path) -> None:
    if fmt != "onnx":
        pytest.skip("the ort-training format needs onnxruntime-training 1.19.2")
    script = (
        "import sys; from edge_trady.engines.ort_runtime import ort_bindings; ort_bindings(); "  # no torch import
        "import onnxruntime; onnxruntime.__version__ = '1.16.3'; from edge_trady.cli import main; "
        f"sys.argv = ['edge-trady', 'run', {str(artifact)!r}, '--train', 'synthetic:4', '--per-class', '4', "
        f"'--out', {str(tmp_path / 'out')!r}]; main()"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "error: onnxruntime 1.16.3 is too old for this artifact (opset 17 needs onnxruntime >= 1.17)" in done.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_plain_onnxruntime_venv_runs_and_evaluates(artifact: Path, fmt: str, tmp_path: Path) -> None:
    """The portable artifact on plain onnxruntime 1.32 in a venv without torch (scripts/setup.sh)."""
    if fmt != "onnx":
        pytest.skip("the ort-training format needs onnxruntime-training")
    if not DEVICE_VENV.exists():
        pytest.skip(f"no device venv at {DEVICE_VENV.parent.parent}: run scripts/setup.sh")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    probe = "import importlib.util as u, onnxruntime as o; print(o.__version__, u.find_spec('torch') is None)"
    versions = subprocess.run([str(DEVICE_VENV), "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert versions.stdout.split() == ["1.32.0", "True"]
    out = tmp_path / "run"
    run = [str(DEVICE_VENV), "-m", "edge_trady", "run", str(artifact), *TRAIN, "--per-class", "8", "--epochs", "2"]
    done = subprocess.run([*run, "--out", str(out), "--quiet"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    evaluate = [str(DEVICE_VENV), "-m", "edge_trady", "evaluate", str(out / "model.onnx"), *DATA, "--per-class", "8"]
    done = subprocess.run(evaluate, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    correct, total = map(int, re.search(r"accuracy \S+ \((\d+)/(\d+)\) loss", done.stdout).groups())
    assert correct / total == read_jsonl(out / "metrics.jsonl")[-1]["val_acc"]


def test_memory_guard_refuses_a_plan_that_does_not_fit_unless_forced(artifact: Path, device, tmp_path: Path) -> None:
    copy = tmp_path / "artifact"
    shutil.copytree(artifact, copy)
    _edit_manifest(copy, lambda d: d["plan"]["memory"]["parts"][0].update(bytes=2**50))  # 1 PiB baseline
    args = ["run", str(copy), *TRAIN, "--per-class", "4", "--epochs", "1", "--out", str(tmp_path / "out")]
    refused = device(*args)
    assert refused.returncode == 3 and refused.stderr.startswith("error: the plan's predicted peak")
    assert re.search(r"peak 1048576\.0 GiB exceeds the memory available to this run, [\d.]+ [GM]iB", refused.stderr)
    assert not (tmp_path / "out").exists()
    forced = device(*args, "--force")
    assert forced.returncode == 0, forced.stderr
    assert "running anyway (--force)" in forced.stderr


def test_export_refuses_a_format_the_plan_does_not_predict(plan_path: Path, fmt: str, tmp_path: Path) -> None:
    other = "ort-training" if fmt == "onnx" else "onnx"
    result = CliRunner().invoke(cli, ["export", str(plan_path), "-o", str(tmp_path / "artifact"), "--format", other])
    assert isinstance(result.exception, ArtifactError)
    assert f"make it with 'edge-trady plan --engine {ENGINE_OF_FORMAT[other]}'" in str(result.exception)
    assert not (tmp_path / "artifact").exists()
