import gc
import subprocess
import sys

from baton.workers.startup import freeze_startup_heap


def test_freeze_moves_live_objects_out_of_collection():
    # In a child: freezing must not leak into this test process's collector.
    code = (
        "import gc, torch\n"
        "from baton.workers.startup import freeze_startup_heap\n"
        "n = freeze_startup_heap()\n"
        "assert n == gc.get_freeze_count() > 10000, n\n"
        "assert len(gc.get_objects()) < 1000, len(gc.get_objects())\n"
        "x = [[]]\n"
        "assert any(o is x for o in gc.get_objects())\n"
        "print(n)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) > 10000


def test_freeze_is_cumulative_and_keeps_collecting_new_cycles():
    frozen_before = gc.get_freeze_count()
    try:
        n = freeze_startup_heap()
        assert n >= frozen_before

        class Node:
            pass

        a, b = Node(), Node()
        a.other, b.other = b, a
        del a, b
        # A cycle made after the freeze is still found by the collector.
        assert gc.collect() >= 2
    finally:
        gc.unfreeze()
