"""The router process carries no torch: text handling comes from baton.workers.text, and
nothing the router's server or `baton router` loads pulls the engine, the model or kernels."""

import subprocess
import sys

HEAVY = ("torch", "triton", "baton.workers.engine", "baton.workers.model", "baton.kernels")


def _modules_loaded_by(statement: str) -> list[str]:
    code = (f"import sys\n{statement}\n"
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return [m for m in out.stdout.strip().split(",") if m]


def test_router_server_imports_no_torch():
    assert _modules_loaded_by("import baton.workers.router.server") == []


def test_router_entry_point_imports_no_torch():
    # What `baton router` loads before it starts serving (its argument parsing included).
    assert _modules_loaded_by("import baton.workers.router.main, baton.workers.cli") == []


def test_text_package_imports_no_torch():
    loaded = _modules_loaded_by(
        "import baton.workers.text, baton.workers.text.chat_template\n"
        "from baton.workers.text import load_tokenizer, IncrementalDetokenizer, StopMatcher")
    assert loaded == []
