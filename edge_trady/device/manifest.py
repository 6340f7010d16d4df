"""Metadata files of the device path (no torch): ``manifest.json`` of a training artifact and the
``model.json`` sidecar of a fine-tuned inference model.

The manifest says what the artifact is (its format, the plan it was exported from, the graph
inputs that carry each layer's selection, input and preprocessing, classes, tool versions) and
holds the sha256 of every other file in the artifact, so a truncated, edited or incomplete copy is
refused before anything runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from ..core import fields as f
from ..core.atomic import write_json
from ..core.json_file import read_json
from ..core.plan import PLAN_VERSION, Plan, check_plan
from ..errors import ArtifactError

FORMAT_VERSION = 2  # 2: the format field; selection_inputs instead of masks
MANIFEST_FILE = "manifest.json"
FORMATS = ("onnx", "ort-training")  # portable (plain onnxruntime) / ONNX Runtime training artifact
_CHUNK = 1 << 20


def _sha256_hex(value: object) -> str | None:
    ok = isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    return None if ok else "a sha256 (64 hex digits)"


_INPUT = {
    "name": f.text,
    "image_size": f.integer(1, 8192),
    "channels": f.one_of(3),
    "dtype": f.one_of("float32"),
    "layout": f.one_of("NCHW"),
}
_CLASS_NAMES = f.optional(f.list_of(f.of_type(str, "x"), "a list of class names"))
MANIFEST_RULES: dict[str, f.Rule] = {
    "selection_inputs": f.mapping(
        f.text,
        lambda m: (
            None
            if isinstance(m, dict)
            and set(m) == {"layer", "channels"}
            and not f.text(m["layer"])
            and not f.integer(1)(m["channels"])
            else "x"
        ),
        'an object of graph input -> {"layer": name, "channels": count}',
    ),
    "input": lambda v: (
        None
        if isinstance(v, dict) and set(v) == set(_INPUT) and not any(r(v[k]) for k, r in _INPUT.items())
        else "an object with name, image_size, channels 3, dtype float32, layout NCHW"
    ),
    "normalization": f.normalization,
    "class_names": _CLASS_NAMES,
    "versions": f.mapping(f.text, f.of_type(str, "x"), "an object of version strings"),
    "files": f.mapping(f.relative_path, _sha256_hex, "an object of relative path -> sha256"),
}
MODEL_INFO_RULES: dict[str, f.Rule] = {
    "image_size": f.integer(1, 8192),
    "input": lambda v: None if isinstance(v, dict) and not f.text(v.get("name")) else 'an object with "name"',
    "normalization": f.normalization,
    "class_names": _CLASS_NAMES,
    "num_classes": f.integer(1, 1 << 20),
    "seed": f.integer(0, 2**32 - 1),
    "artifact_sha256": f.of_type(str, "a string"),
    "model": f.of_type(str, "a string"),
}


@dataclass
class Manifest:
    """What ``edge-trady export`` wrote and ``edge-trady run`` needs to trust an artifact."""

    format: str  # one of FORMATS
    plan: Plan
    selection_inputs: dict[str, dict]  # graph input -> {"layer": name, "channels": its input channels}
    input: dict  # name, image_size, channels, dtype, layout
    normalization: dict  # Normalization.to_dict(): value = (pixel / 255 - mean) / std
    class_names: list[str] | None
    versions: dict[str, str]  # tools that wrote the artifact
    files: dict[str, str]  # path relative to the artifact -> sha256
    format_version: int = FORMAT_VERSION

    @property
    def artifact_sha256(self) -> str:
        """One hash for the whole artifact (over the hashes of its files)."""
        return hashlib.sha256(json.dumps(self.files, sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = MANIFEST_FILE) -> Manifest:
        found = data.get("format_version") if isinstance(data, dict) else None
        if found != FORMAT_VERSION:
            newer = isinstance(found, int) and found > FORMAT_VERSION
            fix = (
                "upgrade edge-trady or export it again with this one"
                if newer
                else "export it again with this edge-trady"
            )
            raise ArtifactError(
                f"{where}: manifest format version {found!r}, this edge-trady reads version {FORMAT_VERSION} "
                f"(the artifact was written by {'a newer' if newer else 'an older'} edge-trady): {fix}"
            )
        _require(data, cls, where)
        if data["format"] not in FORMATS:
            raise ArtifactError(f"{where}: unknown artifact format {data['format']!r} (known: {', '.join(FORMATS)})")
        plan = data["plan"]
        if not isinstance(plan, dict) or plan.get("version") != PLAN_VERSION:
            raise ArtifactError(f"{where}: the plan inside is not a version {PLAN_VERSION} plan")
        _require(plan, Plan, f"{where}: plan")
        check_plan(plan, f"{where}: plan", ArtifactError)
        f.check_fields(data, MANIFEST_RULES, where, ArtifactError)
        if data["input"]["image_size"] != plan["image_size"]:
            raise ArtifactError(
                f"{where}: input image_size {data['input']['image_size']} but the plan's is {plan['image_size']}"
            )
        return cls(**{**data, "plan": Plan(**plan)})

    def save(self, directory: Path) -> None:
        write_json(Path(directory) / MANIFEST_FILE, self.to_dict())

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        """Read and verify the manifest of ``directory``: version, fields, every file's hash."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ArtifactError(f"{directory}: no such artifact directory")
        path = directory / MANIFEST_FILE
        missing = "not found (export the artifact with 'edge-trady export')"
        data = read_json(path, ArtifactError, missing, "unreadable, truncated or edited")
        manifest = cls.from_dict(data, str(path))
        for name, digest in manifest.files.items():
            file = directory / name
            if not file.is_file():
                raise ArtifactError(f"{file}: missing from the artifact")
            if sha256_file(file) != digest:
                raise ArtifactError(f"{file}: content does not match the manifest (truncated or edited)")
        return manifest


def hash_files(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory`` except the manifest, by relative path."""
    directory = Path(directory)
    paths = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    return {p.relative_to(directory).as_posix(): sha256_file(p) for p in paths}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class ModelInfo:
    """``model.json`` next to a fine-tuned ``model.onnx``: how to feed it and where it came from."""

    image_size: int
    input: dict
    normalization: dict
    class_names: list[str] | None
    num_classes: int
    seed: int  # seeds the data subsets (--per-class) and holdouts, so evaluate sees the same images
    artifact_sha256: str
    model: str

    @classmethod
    def of(cls, manifest: Manifest) -> ModelInfo:
        plan = manifest.plan
        return cls(
            image_size=plan.image_size,
            input=manifest.input,
            normalization=manifest.normalization,
            class_names=manifest.class_names,
            num_classes=plan.num_classes,
            seed=plan.seed,
            artifact_sha256=manifest.artifact_sha256,
            model=plan.model,
        )

    @staticmethod
    def sidecar(model_path: Path) -> Path:
        """Where the info of ``model_path`` (``model.onnx``) lives: ``model.json``."""
        return Path(model_path).with_suffix(".json")

    def save(self, model_path: Path) -> None:
        write_json(self.sidecar(model_path), asdict(self))

    @classmethod
    def load(cls, model_path: Path) -> ModelInfo:
        path = cls.sidecar(model_path)
        data = read_json(path, ArtifactError, "not found ('edge-trady run' writes it next to the model)")
        _require(data, cls, str(path))
        f.check_fields(data, MODEL_INFO_RULES, str(path), ArtifactError)
        return cls(**data)


def _require(data: object, cls: type, where: str) -> None:
    """Raise ArtifactError unless ``data`` is a dict with every required field of ``cls``."""
    if not isinstance(data, dict):
        raise ArtifactError(f"{where}: expected a JSON object")
    names = {f.name for f in fields(cls)}
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    missing, unknown = sorted(required - set(data)), sorted(set(data) - names)
    if missing or unknown:
        raise ArtifactError(f"{where}: missing fields {missing}, unknown fields {unknown}")
