"""The repository's top-level folders never shadow top-level packages, and the reference model
the parity tests compare against imports the way the suite imports it.

kernels/, operator/, workers/ and proto/ are the packages baton.kernels, baton.operator, ...;
under their bare names they would shadow Hugging Face's `kernels` (which transformers imports
when it is importable), the standard library's `operator`, and anything named workers or proto.
Python puts the current directory first on sys.path for `python -m` / `python -c`, so a test
run from the repository root must not (Makefile: PYTHONSAFEPATH and the venv's pytest;
tests/conftest.py: the root off sys.path, PYTHONSAFEPATH for subprocesses).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import pathlib
import subprocess
import sys

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

REPO = pathlib.Path(__file__).resolve().parents[1]
FOLDERS = ("kernels", "operator", "workers", "proto")

_SHADOW_CHECK = """
import importlib.util, json, sys
found = {}
for name in sys.argv[1:]:
    spec = importlib.util.find_spec(name)
    found[name] = spec.origin if spec is not None else None
print(json.dumps(found))
"""


def _inside_repo(origin: str | None) -> bool:
    """A path in the checkout's own folders (a virtual environment inside it does not count)."""
    if origin is None or origin in ("built-in", "frozen"):
        return False
    path = pathlib.Path(origin).resolve()
    if path != REPO and REPO not in path.parents:
        return False
    return "site-packages" not in path.relative_to(REPO).parts


def _shadows(found: dict[str, str | None]) -> dict[str, str]:
    return {name: origin for name, origin in found.items() if _inside_repo(origin)}


def test_no_repository_folder_is_importable_under_its_bare_name():
    found = {}
    for name in FOLDERS:
        spec = importlib.util.find_spec(name)
        found[name] = spec.origin if spec is not None else None
    assert not _shadows(found), (
        f"the repository root is on sys.path ({sys.path[:3]}...): these bare names resolve to "
        f"its folders: {_shadows(found)}")
    for name in FOLDERS:
        module = sys.modules.get(name)
        assert module is None or not _inside_repo(getattr(module, "__file__", None)), (
            f"sys.modules[{name!r}] is the repository's folder {module.__file__}")


def test_subprocesses_started_from_the_root_see_no_shadow():
    # Tests start workers and tools as `sys.executable -m ...` / `-c ...` with the repository
    # root as their working directory: the environment they inherit must keep it off sys.path.
    out = subprocess.run([sys.executable, "-c", _SHADOW_CHECK, *FOLDERS], cwd=REPO,
                         capture_output=True, text=True, check=True)
    found = json.loads(out.stdout)
    assert not _shadows(found), f"a subprocess run from the root resolves {_shadows(found)}"


def test_reference_model_imports_from_the_root():
    # The exact import the parity and kernel tests make, in a subprocess started the way the
    # suite starts them (working directory: the repository root).
    code = ("from transformers.models.nemotron_h.modeling_nemotron_h import "
            "NemotronHForCausalLM, NemotronHTopkRouter; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_installed_reference_versions_are_within_the_tested_bounds():
    # The bounds in pyproject's test extra say which versions the parity tests were run with;
    # an environment outside them (installed by hand, or a resolver ignoring the bound) is
    # not the one CI tests, and a failure in the parity tests would not say why.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    bounded = {}
    for line in project["optional-dependencies"]["test"]:
        requirement = Requirement(line)
        if requirement.name == "transformers":
            bounded[requirement.name] = requirement.specifier
    assert "transformers" in bounded, "pyproject's test extra must bound transformers"
    specifier = bounded["transformers"]
    assert any(s.operator in ("<", "<=", "==", "~=") for s in specifier), (
        f"transformers{specifier} has no upper bound: a new release could turn main red")
    installed = importlib.metadata.version("transformers")
    assert specifier.contains(installed), (
        f"transformers {installed} is installed, outside the tested bounds {specifier}")
    oldest = (REPO / "constraints-oldest.txt").read_text().split("transformers==")[1].split()[0]
    lower = [s.version for s in specifier if s.operator == ">="]
    assert lower and Version(lower[0]) == Version(oldest), (
        f"constraints-oldest.txt pins transformers {oldest}; pyproject's lower bound is {lower}")
