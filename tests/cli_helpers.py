"""Run the CLI entry point in this process, as a user's shell would see it."""

import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from edge_trady.cli import main


def edge_trady(*args: object) -> tuple[int, str, str]:
    """``edge-trady ARGS`` through ``edge_trady.cli.main``: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def one_error_line(err: str) -> str:
    """The ``error: ...`` line that ends ``err`` (asserting there is one and no traceback)."""
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, err
    return lines[-1]


def small_artifact(root: Path, engine: str = "ort") -> tuple[Path, Path]:
    """Plan (for ``engine``: ort or portable) and export MobileNetV2-w0.35 at 32 px for 4 synthetic
    classes, 5 % of its channels drawn from every layer (no ranking needed), batch 8, 2 epochs:
    (plan.json, artifact folder)."""
    code, _, err = edge_trady(
        "plan", "--model", "mobilenetv2-w0.35", "--image-size", "32", "--profile", "this-workstation",
        "--engine", engine, "--method", "d-full-random", "--budget", "5%", "--data", "synthetic:4",
        "--per-class", "8", "--batch-size", "8", "--epochs", "2", "--lr", "0.01", "-o", root / "plan.json", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    code, _, err = edge_trady("export", root / "plan.json", "-o", root / "artifact", "--quiet")
    assert code == 0, err
    return root / "plan.json", root / "artifact"
