"""The `baton` namespace maps the top-level folders, and the CLI imports nothing heavy."""

import os
import subprocess
import sys


def test_namespace_maps_folders():
    import baton.kernels
    import baton.operator
    import baton.proto
    import baton.workers

    for module, folder in [(baton.operator, "operator"), (baton.workers, "workers"),
                           (baton.kernels, "kernels"), (baton.proto, "proto")]:
        assert module.__file__.replace("\\", "/").endswith(f"{folder}/__init__.py")


def test_stdlib_operator_not_shadowed():
    import operator

    assert hasattr(operator, "itemgetter")


def test_cli_help_is_cheap():
    code = ("import sys, baton.workers.cli as c; c.main(['--help']); "
            "heavy = [m for m in ('torch', 'kopf', 'grpc') if m in sys.modules]; "
            "assert not heavy, heavy")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "baton up" not in out.stderr
    assert "up" in out.stdout and "worker" in out.stdout


def test_cli_unknown_command_is_clear():
    from baton.workers.cli import main

    assert main(["frobnicate"]) == 2


def test_checkout_root_on_sys_path_does_not_shadow_stdlib_operator():
    # `python -m ...` from a checkout puts the repository root first on sys.path; with no site
    # packages importing the real module earlier (-S, as in a fresh venv), `import operator`
    # finds the operator/ folder. It must behave as the standard library module.
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    code = ("import operator, collections, contextlib; "
            "assert operator.itemgetter(1)([0, 7]) == 7; assert not hasattr(operator, '__path__')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}  # the root on sys.path
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=root, capture_output=True,
                         text=True, env=env)
    assert out.returncode == 0, out.stderr
