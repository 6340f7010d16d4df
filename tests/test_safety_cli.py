"""What the user sees when things go wrong, through the CLI entry point (``edge_trady.cli.main``):
run folders and artifacts are never destroyed by accident, a finished run is final, resume checks
its origin, the memory guard looks at the real data and at an address-space limit, code runs only
when trusted, divergence stops the run, and every failure is one line with a documented status."""

import json
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import edge_trady, one_error_line
from PIL import Image

from edge_trady.device.data import IMAGENET, load_dataset
from edge_trady.device.manifest import MANIFEST_FILE
from edge_trady.errors import EXIT_STATUSES, DataError

RUN = ["--train", "synthetic:4", "--per-class", "8", "--quiet"]
EVIL = """
from pathlib import Path
Path(__file__).with_name("executed").write_text("the model factory ran")
def make(num_classes=4):
    raise SystemExit("never reached in these tests")
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("safety")


@pytest.fixture(scope="module")
def plan(small_artifact) -> Path:
    return small_artifact[0]


@pytest.fixture(scope="module")
def artifact(small_artifact) -> Path:
    return small_artifact[1]


@pytest.fixture(scope="module")
def finished(root: Path, artifact: Path) -> Path:
    out = root / artifact.parent.name / "run"  # one per artifact format
    code, _, err = edge_trady("run", artifact, *RUN, "--out", out)
    assert code == 0, err
    return out


def _snapshot(root: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _copy(artifact: Path, to: Path, edit=None) -> Path:
    shutil.copytree(artifact, to)
    if edit:
        data = json.loads((to / MANIFEST_FILE).read_text())
        edit(data)
        (to / MANIFEST_FILE).write_text(json.dumps(data))
    return to


def test_help_lists_the_exit_statuses() -> None:
    code, out, _ = edge_trady("--help")
    assert code == 0 and "Exit status:" in out
    for status, meaning in EXIT_STATUSES.items():
        assert re.search(rf"^\s+{status}\s+{re.escape(meaning[:30])}", out, re.M), status


def test_a_finished_run_is_final_and_a_non_empty_out_is_refused(finished: Path, artifact: Path) -> None:
    assert (finished / "done.json").is_file() and (finished / "model.onnx").is_file()
    (finished / "notes.txt").write_text("the user's")
    before = _snapshot(finished.parent)
    code, _, err = edge_trady("run", artifact, *RUN, "--out", finished)
    assert code == 2 and "holds a finished run" in one_error_line(err) and "--resume continues" in err
    code, _, err = edge_trady("run", artifact, *RUN, "--out", finished, "--resume")  # systemd at boot
    assert code == 0 and err == ""
    assert _snapshot(finished.parent) == before  # nothing written, not even a lock file


def test_overwrite_replaces_only_what_edge_trady_wrote(finished: Path, artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "notes.txt").write_text("the user's")
    (out / "checkpoints" / "mine").mkdir()
    code, _, err = edge_trady("run", artifact, *RUN[:-1], "--out", out, "--overwrite")
    assert code == 0, err
    assert "kept what edge-trady did not write: checkpoints/mine, notes.txt" in err
    assert (out / "notes.txt").read_text() == "the user's" and (out / "checkpoints" / "mine").is_dir()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2 and (out / "done.json").is_file()


def test_export_never_destroys_a_folder(plan: Path, artifact: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "photo.jpg").write_bytes(b"precious")
    before = _snapshot(tmp_path)
    code, _, err = edge_trady("export", plan, "-o", f"{mine}/sub/..")
    assert code == 2 and f"{mine}: not empty and not an artifact (photo.jpg)" in one_error_line(err)
    assert _snapshot(tmp_path) == before
    copy = _copy(artifact, tmp_path / "artifact")
    code, _, err = edge_trady("export", plan, "-o", copy)
    assert code == 2 and "holds an artifact already; --overwrite replaces it" in one_error_line(err)
    (copy / "README.txt").write_text("notes")
    before = _snapshot(tmp_path)
    code, _, err = edge_trady("export", plan, "-o", copy, "--overwrite")
    assert code == 2 and "holds files that are not part of its artifact (README.txt)" in one_error_line(err)
    assert _snapshot(tmp_path) == before


def test_overwriting_an_artifact_swaps_it_whole_and_resume_refuses_the_other_artifact(
    plan: Path, artifact: Path, finished: Path, tmp_path: Path
) -> None:
    """A run stopped before its end (no done.json), resumed against another export (another seed)."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    for name in ("done.json", "summary.json", "model.onnx", "model.json"):
        (out / name).unlink()
    other_plan = json.loads(plan.read_text()) | {"seed": 1}
    (tmp_path / "plan-seed1.json").write_text(json.dumps(other_plan))
    other = _copy(artifact, tmp_path / "artifact")
    code, _, err = edge_trady("export", tmp_path / "plan-seed1.json", "-o", other, "--overwrite", "--quiet")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact", "plan-seed1.json", "run"]  # no staging left
    assert json.loads((other / MANIFEST_FILE).read_text())["plan"]["seed"] == 1
    before = _snapshot(out)
    code, _, err = edge_trady("run", other, *RUN, "--out", out, "--resume")
    line = one_error_line(err)
    assert code == 2 and "was made by another run: artifact_sha256" in line, line
    assert _snapshot(out) == before


def test_device_commands_never_execute_code_named_by_an_artifact(artifact: Path, tmp_path: Path) -> None:
    (tmp_path / "evil.py").write_text(EVIL)
    ref = f"{tmp_path / 'evil.py'}:make"
    copy = _copy(artifact, tmp_path / "artifact", lambda d: d["plan"].update(model=ref))
    code, _, err = edge_trady("run", copy, *RUN, "--epochs", "1", "--out", tmp_path / "run")
    assert code == 0, err
    info = tmp_path / "run" / "model.json"
    info.write_text(json.dumps(json.loads(info.read_text()) | {"model": ref}))
    code, _, err = edge_trady("evaluate", tmp_path / "run" / "model.onnx", "--data", "synthetic:4", "--per-class", "4")
    assert code == 0, err
    assert not (tmp_path / "executed").exists()


def test_model_code_runs_only_when_trusted(plan: Path, tmp_path: Path) -> None:
    (tmp_path / "evil.py").write_text(EVIL)
    ref = f"{tmp_path / 'evil.py'}:make"
    evil_plan = tmp_path / "plan.json"
    evil_plan.write_text(json.dumps(json.loads(plan.read_text()) | {"model": ref}))
    for args in (
        ("export", evil_plan, "-o", tmp_path / "artifact"),
        ("finetune", "--plan", evil_plan, "--data", "synthetic:4", "--out", tmp_path / "ft"),
        ("inspect", "--model", ref),
        ("plan", "--model", ref, "--profile", "this-workstation", "--num-classes", "4", "--method", "full-frozen-bn"),
    ):
        code, _, err = edge_trady(*args)
        assert code == 2 and "pass --trust-model-code if you trust it" in one_error_line(err), args
    assert not (tmp_path / "executed").exists()
    code, out, _ = edge_trady("export", "--help")
    out = " ".join(out.split())
    assert "--trust-model-code" in out and "runs its Python code" in out


def test_divergence_exits_4_and_exports_nothing(artifact: Path, tmp_path: Path) -> None:
    copy = _copy(artifact, tmp_path / "artifact", lambda d: d["plan"].update(lr=1e30))
    code, _, err = edge_trady("run", copy, *RUN, "--out", tmp_path / "run")
    line = one_error_line(err)
    assert code == 4 and "training diverged at epoch 1/2, step" in line and "no checkpoint had been written" in line
    assert not (tmp_path / "run" / "model.onnx").exists() and not (tmp_path / "run" / "done.json").exists()


def test_the_guard_rechecks_the_fit_with_the_real_data(artifact: Path, tmp_path: Path, monkeypatch) -> None:
    """The plan assumed 8 images per class; 40 are loaded: the re-check refuses (or warns, --force)."""
    import edge_trady.device.runner as runner

    manifest = json.loads((artifact / MANIFEST_FILE).read_text())
    peak = manifest["plan"]["memory"]["peak_bytes"]
    monkeypatch.setattr(runner, "current_rss_bytes", lambda: 0)
    monkeypatch.setattr(runner, "available_memory", lambda reserve=0: (peak + 2**16, "a test limit"))
    args = ["run", artifact, "--train", "synthetic:4", "--per-class", "40", "--out", tmp_path / "run"]
    code, _, err = edge_trady(*args)
    assert code == 3, err
    assert "note: the data holds 320 images" in err and "the plan assumed 64" in err
    assert "with the data as loaded (320 images), the predicted peak" in one_error_line(err)
    code, _, err = edge_trady(*args, "--force", "--epochs", "1")
    assert code == 0 and "running anyway (--force)" in err


def test_an_address_space_limit_counts_as_memory(artifact: Path, tmp_path: Path) -> None:
    limit = 250 * 2**20

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    done = subprocess.run(
        [sys.executable, "-m", "edge_trady", "run", str(artifact), *RUN, "--out", str(tmp_path / "run")],
        preexec_fn=limited,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 3, done.stderr
    assert "limited by the address-space limit (RLIMIT_AS" in one_error_line(done.stderr)


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` (no pixel data: decoding is refused first)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("size", "limit", "message"),
    [
        ((5000, 5000), None, "5000 x 5000 pixels, more than the 16,777,216-pixel cap on decoded images"),
        ((20000, 20000), None, "refused by Pillow's decompression-bomb check"),
        ((64, 64), "1000", "64 x 64 pixels, more than the 1,000-pixel cap"),
    ],
)
def test_decoded_image_size_is_capped(tmp_path: Path, monkeypatch, size, limit, message: str) -> None:
    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / split / name / "small.png")
    big = tmp_path / "train" / "a" / "big.png"
    if size == (64, 64):
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(big)
    else:
        big.write_bytes(_png_header(*size))
    if limit:
        monkeypatch.setenv("EDGE_TRADY_MAX_IMAGE_PIXELS", limit)
    with pytest.raises(DataError, match=message):
        load_dataset(str(tmp_path), "train", 16, IMAGENET)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["plan", "--lr", "-1"], "Invalid value for '--lr': -1.0 is not a finite number > 0"),
        (["plan", "--lr", "nan"], "Invalid value for '--lr': nan is not a finite number > 0"),
        (["plan", "--seed", "-1"], "Invalid value for '--seed'"),
        (["finetune", "--seed", "-1", "--data", "synthetic:4", "--out", "x"], "Invalid value for '--seed'"),
        (["plan", "--budget", "0"], "budget '0' selects no channel"),
        (["finetune", "--budget", "0", "--data", "synthetic:4", "--out", "{tmp}/ft"], "budget '0' selects no channel"),
        (["profile", "-o", "{tmp}/missing-dir/x.json", "--engines", "none", "--bench-seconds", "0", "-q"],
         "missing-dir/x.json: No such file or directory"),
        (["run", "{artifact}", *RUN, "--out", "{plan}/sub"], "plan.json/sub: Not a directory"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_with_status_2(artifact: Path, plan: Path, tmp_path: Path, args, message) -> None:
    common = {"plan": ["--model", "mobilenetv2-w0.35", "--profile", "this-workstation", "--num-classes", "4"]}
    filled = [a.format(tmp=tmp_path, artifact=artifact, plan=plan) for a in args]
    code, _, err = edge_trady(*filled, *common.get(filled[0], []))
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err, err
    assert last.startswith(("error: ", "Error: ")) and message in last, err  # click's usage errors: "Error:"


def test_a_budget_above_full_fine_tuning_is_capped(tmp_path: Path) -> None:
    code, _, err = edge_trady(
        "plan", "--model", "mobilenetv2-w0.35", "--image-size", "32", "--profile", "this-workstation",
        "--num-classes", "4", "--method", "d-full-random", "--budget", "100000000000000000000",
        "-o", tmp_path / "p.json",
    )  # fmt: skip
    assert code == 0, err
    assert re.search(r"note: budget 100,000,000,000,000,000,000 units exceeds full fine-tuning \([\d,]+ units\)", err)
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["budget"] < 1e7 and any("capped" in note for note in plan["notes"])


@pytest.mark.parametrize(
    ("failure", "status", "message"),
    [
        (MemoryError("Unable to allocate 3.00 GiB for an array"), 3, "out of memory (Unable to allocate 3.00 GiB"),
        (RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : std::bad_alloc"), 3, "out of memory ("),
        (OSError(28, "No space left on device", "metrics.jsonl"), 2, "metrics.jsonl: No space left on device"),
        (KeyError("a bug"), 1, "internal error (KeyError: 'a bug'); EDGE_TRADY_DEBUG=1 shows the traceback"),
    ],
)
def test_failures_inside_a_run_are_one_line(
    artifact: Path, tmp_path: Path, monkeypatch, failure: Exception, status: int, message: str
) -> None:
    import edge_trady.device.loop as loop

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.delenv("EDGE_TRADY_DEBUG", raising=False)
    monkeypatch.setattr(loop.RunLog, "write", fail)
    code, _, err = edge_trady("run", artifact, *RUN, "--out", tmp_path / "run")
    assert code == status and message in one_error_line(err), err
    assert len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "run" / ".edge-trady.lock")  # released


def test_finetune_resume_with_another_model_is_refused_by_name(tmp_path: Path) -> None:
    """Once a traceback from load_state_dict; now the origin check names the model."""
    out = tmp_path / "ft"
    args = ["finetune", "--data", "synthetic:4", "--per-class", "4", "--image-size", "32", "--batch-size", "8",
            "--method", "d-full-random", "--budget", "5%", "--epochs", "1", "--out", out, "--quiet"]  # fmt: skip
    code, _, err = edge_trady(*args, "--model", "mobilenetv2-w0.35")
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["initial_val_acc"] is not None
    (out / "done.json").unlink()  # as if killed before the end
    code, _, err = edge_trady(*args, "--model", "mobilenetv2-w0.5", "--resume")
    line = one_error_line(err)
    assert code == 2 and "was made by another run: model 'mobilenetv2-w0.35' there, 'mobilenetv2-w0.5' here" in line
