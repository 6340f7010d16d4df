"""Property: whatever a manifest, layout, plan, profile or checkpoint says, edge-trady either does
a correct run or exits != 0 with one ``error:`` line (never status 1, the internal-error status,
never a traceback), and touches nothing outside ``--out``.

Both artifact formats (conftest's ``small_artifact``): the ort-training layout.json and the portable
portable.json. Each field of the file is replaced by a value of another type or out of range, deleted, or joined
by an unknown one. The default suite runs a few derandomized examples per file;
``python -m pytest -m slow tests/test_fuzz_inputs.py`` runs many more, random ones."""

import copy
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import pytest
from cli_helpers import edge_trady
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_trady.device.manifest import MANIFEST_FILE
from edge_trady.device.profile import load_profile
from edge_trady.engines.portable_format import LAYOUT_FILE

RUN = ["--train", "synthetic:4", "--per-class", "4", "--epochs", "1", "--quiet"]
ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 3, 2**31, 2**64, 1e30, -1e30, 0.5, float("nan"), float("inf"), -float("inf")]),
    st.text(max_size=12),
    st.sampled_from(["", "../../outside", "/etc/passwd", "x" * 300, "synthetic:4", "efficientnet-lite0"]),
    st.lists(st.integers(-2, 40), max_size=3),
    st.dictionaries(st.sampled_from(["name", "mean", "x"]), st.integers(-1, 3), max_size=2),
)


def _paths(doc: object, prefix: tuple = (), depth: int = 4) -> list[tuple]:
    """Every key path of a JSON document (dict keys, the first 3 list items), to ``depth``."""
    found = [prefix] if prefix else []
    if depth and isinstance(doc, dict):
        for key, value in doc.items():
            found += _paths(value, (*prefix, key), depth - 1)
    elif depth and isinstance(doc, list):
        for index, value in enumerate(doc[:3]):
            found += _paths(value, (*prefix, index), depth - 1)
    return found


@st.composite
def mutated(draw, doc: dict) -> dict:
    """``doc`` with one field replaced, deleted, or an unknown field added next to it."""
    path = draw(st.sampled_from(_paths(doc)))
    kind = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
    value = draw(ODD_VALUES)
    doc = copy.deepcopy(doc)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if kind == "replace":
        parent[last] = value
    elif kind == "delete" and isinstance(parent, dict):
        del parent[last]
    elif kind == "delete":
        parent.pop(last)
    elif isinstance(parent, dict):
        parent["unexpected_field"] = value
    else:
        parent.append(value)
    return doc


def _snapshot(root: Path, skip: Path) -> dict:
    return {
        p: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
        if skip not in p.parents and p != skip
    }


def _check(root: Path, out: Path, *args: object) -> int:
    """Run ``edge-trady ARGS``; assert the property; return the exit status."""
    before = _snapshot(root, out)
    code, _, err = edge_trady(*args)
    assert "Traceback" not in err, err
    assert code != 1, f"internal error: {err}"
    if code:
        assert err.strip().splitlines()[-1].startswith(("error: ", "Error: ")), err
    assert _snapshot(root, out) == before, "something outside --out changed"
    return code


def _write(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc))


def _rehash(artifact: Path, name: str) -> None:
    """Update the manifest's hash of ``name`` (an artifact edited consistently, not truncated)."""
    manifest = json.loads((artifact / MANIFEST_FILE).read_text())
    manifest["files"][name] = hashlib.sha256((artifact / name).read_bytes()).hexdigest()
    _write(artifact / MANIFEST_FILE, manifest)


FEW = settings(
    max_examples=4,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
MANY = settings(FEW, max_examples=60, derandomize=False)


def _manifest_case(artifact: Path, doc: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        copy_ = root / "artifact"
        shutil.copytree(artifact, copy_)
        _write(copy_ / MANIFEST_FILE, doc)
        out = root / "run"
        if _check(root, out, "run", copy_, *RUN, "--out", out) == 0:
            assert (out / "done.json").is_file() and (out / "model.onnx").is_file()


def _layout_file(artifact: Path) -> str:
    """The layout file of the artifact's format: layout.json (ort-training) or portable.json (onnx)."""
    return LAYOUT_FILE if json.loads((artifact / MANIFEST_FILE).read_text())["format"] == "onnx" else "layout.json"


def _layout_case(artifact: Path, doc: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        copy_ = root / "artifact"
        shutil.copytree(artifact, copy_)
        _write(copy_ / _layout_file(artifact), doc)
        _rehash(copy_, _layout_file(artifact))
        out = root / "run"
        if _check(root, out, "run", copy_, *RUN, "--out", out) == 0:
            assert (out / "done.json").is_file()


def _plan_case(plan: Path, doc: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _write(root / "plan.json", doc)
        out = root / "artifact"
        if _check(root, out, "export", root / "plan.json", "-o", out, "--quiet") == 0:
            assert (out / MANIFEST_FILE).is_file()


def _profile_case(doc: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _write(root / "profile.json", doc)
        out = root / "out"
        out.mkdir()
        plan = [
            "plan", "--model", "mobilenetv2-w0.35", "--image-size", "32", "--num-classes", "4",
            "--method", "classifier-only", "--profile", root / "profile.json", "-o", out / "plan.json", "--quiet",
        ]  # fmt: skip
        if _check(root, out, *plan) == 0:
            assert (out / "plan.json").is_file()


def _checkpoint_case(stopped: Path, artifact: Path, doc: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        out = root / "run"
        shutil.copytree(stopped, out)
        _write(out / "checkpoints" / "epoch0001-step000000" / "loop_state.json", doc)
        args = ["run", artifact, "--train", "synthetic:4", "--per-class", "8", "--quiet", "--out", out, "--resume"]
        code = _check(root, out, *args)
        if code == 0:
            assert (out / "done.json").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.fixture(scope="module")
def stopped(small_artifact, tmp_path_factory) -> Path:
    """A run of the small artifact stopped after its first epoch (as a kill would leave it)."""
    _, artifact = small_artifact
    out = tmp_path_factory.mktemp("stopped") / "run"
    code, _, err = edge_trady("run", artifact, "--train", "synthetic:4", "--per-class", "8", "--quiet", "--out", out)
    assert code == 0, err
    for name in ("done.json", "summary.json", "model.onnx", "model.json"):
        (out / name).unlink()
    shutil.rmtree(out / "checkpoints" / "epoch0002-step000000")
    (out / "checkpoints" / "LATEST").write_text("epoch0001-step000000")
    for log in ("metrics.jsonl", "selection.jsonl"):
        (out / log).write_text((out / log).read_text().splitlines()[0] + "\n")
    return out


def _doc(path: Path) -> dict:
    return json.loads(path.read_text())


def _profile_doc() -> dict:
    return load_profile("this-workstation").to_dict()


def _cases(small_artifact, stopped):
    plan, artifact = small_artifact
    return {
        "manifest": (_doc(artifact / MANIFEST_FILE), lambda doc: _manifest_case(artifact, doc)),
        "layout": (_doc(artifact / _layout_file(artifact)), lambda doc: _layout_case(artifact, doc)),
        "plan": (_doc(plan), lambda doc: _plan_case(plan, doc)),
        "profile": (_profile_doc(), _profile_case),
        "checkpoint": (
            _doc(stopped / "checkpoints" / "epoch0001-step000000" / "loop_state.json"),
            lambda doc: _checkpoint_case(stopped, artifact, doc),
        ),
    }


FILES = ["manifest", "layout", "plan", "profile", "checkpoint"]


@pytest.mark.parametrize("name", FILES)
def test_mutated_files_fail_cleanly_or_run(small_artifact, stopped, name: str) -> None:
    doc, case = _cases(small_artifact, stopped)[name]
    FEW(given(mutated(doc))(case))()


@pytest.mark.slow
@pytest.mark.parametrize("name", FILES)
def test_many_mutated_files_fail_cleanly_or_run(small_artifact, stopped, name: str) -> None:
    doc, case = _cases(small_artifact, stopped)[name]
    MANY(given(mutated(doc))(case))()
