"""Assemble the runtime image's file system (Dockerfile, LAYOUT=flat) in DEST: only what the
runner needs, copied from the build stage's base image.

    python3 slim_rootfs.py DEST

DEST gets: the venv (/opt/venv), the Python interpreter it points at, the standard library
compiled into the interpreter's zip archive (pythonXY.zip, which is on sys.path before the
library folder; the folder keeps os.py as the landmark Python looks for, and lib-dynload/), a
shell and a few basic tools for `docker exec`, the users, the C.UTF-8 locale, and every shared
library these programs load (the ldd closure; the loader cache is rebuilt with ldconfig). Then it
checks, chrooted into DEST, that every ELF file finds its libraries and that the runner starts.
Uses only the standard library and the base's libc tools (ldd, ldconfig, chroot).
"""

from __future__ import annotations

import os
import py_compile
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

VENV = Path("/opt/venv")
# files and folders copied as they are (those missing in the base are skipped)
KEEP = [
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/os-release",
    "/usr/lib/os-release",
    "/usr/lib/locale/C.utf8",
    "/usr/local/bin/edge-trady-with-exit-hook",
    "/home/trady",
    "/work",
    str(VENV),
]
# programs for the compose command, the exit hook wrapper and `docker exec` (missing: skipped)
PROGRAMS = ["sh", "env", "cat", "ls", "cp", "mv", "rm", "mkdir", "rmdir", "ln", "chmod", "touch", "sleep", "id"]
PROGRAMS += ["date", "du", "df", "head", "tail", "wc", "grep", "sed", "find", "sort", "tr", "stat", "readlink"]
# standard library parts a runtime never imports (development, GUI, tests, packaging)
STDLIB_SKIP = {
    "test",
    "idlelib",
    "lib2to3",
    "ensurepip",
    "tkinter",
    "turtledemo",
    "pydoc_data",
    "distutils",
    "venv",
    "site-packages",
    "dist-packages",
    "lib-dynload",
    "__pycache__",
}
LDD_LINE = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x")


def main(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):  # merged-/usr links first
        if Path("/", top).is_symlink():
            link = os.readlink(Path("/", top))
            (dest / link.lstrip("/")).mkdir(parents=True, exist_ok=True)
            (dest / top).symlink_to(link)
    (dest / "tmp").mkdir(mode=0o1777, exist_ok=True)
    (dest / "tmp").chmod(0o1777)
    for path in KEEP:
        copy(Path(path), dest)
    python = Path(os.path.realpath(VENV / "bin" / "python"))
    copy(Path(sysconfig.get_config_var("BINDIR") or python.parent) / "python3", dest)
    copy(python, dest)
    for name in PROGRAMS:
        found = shutil.which(name)
        if found:
            copy(Path(found), dest)
    stdlib = Path(sysconfig.get_path("stdlib"))
    archive = next(Path(p) for p in sys.path if p.endswith(".zip"))
    zip_stdlib(stdlib, dest / archive.relative_to("/"))
    copy(stdlib / "os.py", dest)  # the landmark: Python finds its prefix by this file
    copy(stdlib / "lib-dynload", dest)
    loader = copy_libraries(dest)
    subprocess.run(["ldconfig", "-r", str(dest)], check=True)
    check(dest, loader)


def copy(src: Path, dest: Path) -> None:
    """Copy ``src`` (a file, a symlink with its target, or a folder) to the same path in ``dest``."""
    if not src.exists() and not src.is_symlink():
        return
    target = dest / src.relative_to("/")
    if target.exists() or target.is_symlink():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    if src.is_symlink():
        link = os.readlink(src)
        target.symlink_to(link)
        copy(Path(os.path.normpath(src.parent / link)), dest)
    elif src.is_dir():
        shutil.copytree(src, target, symlinks=True)
    else:
        shutil.copy2(src, target)


def zip_stdlib(stdlib: Path, archive: Path) -> None:
    """The standard library's modules as bytecode (unchecked hash: valid without the sources)."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf, tempfile.TemporaryDirectory() as tmp:
        for source in sorted(stdlib.rglob("*.py")):
            rel = source.relative_to(stdlib)
            if rel.parts[0] in STDLIB_SKIP or "__pycache__" in rel.parts:
                continue
            compiled = Path(tmp) / "module.pyc"
            py_compile.compile(
                str(source),
                cfile=str(compiled),
                dfile=str(stdlib / rel),
                doraise=True,
                invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
            )
            zf.write(compiled, str(rel.with_suffix(".pyc")))


def elf_files(root: Path) -> list[Path]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                if handle.read(4) == b"\x7fELF":
                    found.append(path)
    return found


def copy_libraries(dest: Path) -> str:
    """Copy every library the ELF files in ``dest`` load (repeated until nothing new); returns
    the dynamic loader's path."""
    loader, seen = "", set()
    while True:
        new = [p for p in elf_files(dest) if p not in seen]
        if not new:
            return loader
        for path in new:
            seen.add(path)
            original = Path("/") / path.relative_to(dest)
            out = subprocess.run(["ldd", str(original)], capture_output=True, text=True).stdout
            for line in out.splitlines():
                match = LDD_LINE.search(line)
                if match:
                    copy(Path(match.group(1)), dest)
                    if "=>" not in line:
                        loader = match.group(1)


def check(dest: Path, loader: str) -> None:
    """Chrooted into ``dest``: every ELF file resolves its libraries; the runner imports."""
    missing = []
    for path in elf_files(dest):
        inside = "/" + str(path.relative_to(dest))
        out = subprocess.run(["chroot", str(dest), loader, "--list", inside], capture_output=True, text=True)
        missing += [f"{inside}: {line.strip()}" for line in out.stdout.splitlines() if "not found" in line]
    if missing:
        sys.exit("missing libraries in the runtime root:\n" + "\n".join(missing))
    probe = "import click, numpy, psutil, PIL.Image, edge_trady.cli; print('runtime root ok')"
    subprocess.run(["chroot", str(dest), str(VENV / "bin" / "python"), "-c", probe], check=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
