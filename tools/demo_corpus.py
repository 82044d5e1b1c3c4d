"""The code half of the demo model's training data: the Python standard library's own source,
which every machine with Python has, split into training files and a fixed held-out list.

The split is by module: HELD_OUT names whole modules the model never sees in training; their
files are the evaluation set of `baton perplexity` and of the MTP acceptance benchmark. Test
suites, tool GUIs and data tables are left out of training (they are mostly fixtures and
generated tables, not code people write).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

# Single-file modules present in every Python from 3.10 on, about 200 KB of code together.
HELD_OUT = ("bisect", "colorsys", "fnmatch", "fractions", "glob", "graphlib", "heapq",
            "queue", "sched", "shlex", "statistics", "textwrap")

# Folders of the standard library that are not training material.
EXCLUDED_DIRS = frozenset({
    "test", "tests", "idle_test", "idlelib", "turtledemo", "site-packages", "dist-packages",
    "lib2to3", "pydoc_data", "encodings", "ensurepip", "__pycache__", "__phello__",
    "config-3.10-x86_64-linux-gnu", "lib-dynload",
})


def stdlib_root() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def held_out_files(root: Path | None = None) -> list[Path]:
    """The evaluation files, in HELD_OUT order."""
    root = root or stdlib_root()
    files = [root / f"{name}.py" for name in HELD_OUT]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"held-out modules missing from this Python: {missing}")
    return files


def training_files(root: Path | None = None) -> list[Path]:
    """Every other .py file of the standard library, sorted by relative path (the same list on
    every machine with the same Python version)."""
    root = root or stdlib_root()
    held = {f.name for f in held_out_files(root)}
    files = []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        parts = path.relative_to(root).parts
        if any(part in EXCLUDED_DIRS or part.startswith("config-") for part in parts[:-1]):
            continue
        if len(parts) == 1 and path.name in held:
            continue
        files.append(path)
    return files


def read_source(path: Path) -> str:
    """A source file as text; undecodable bytes (a few files carry Latin-1) are replaced."""
    return path.read_bytes().decode("utf-8", errors="replace")
