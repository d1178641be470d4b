"""`import bilevel` is light: torch and the library core, not the benchmark harness."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = ["sklearn", "matplotlib", "PIL", "fontTools", "yaml", "bilevel.tasks", "bilevel.data",
           "bilevel.bench", "bilevel.plots", "bilevel.cli"]  # fmt: skip

PROBE = """
import json, sys

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

import torch
after_torch = rss_mb()
import bilevel
after_bilevel = rss_mb()
loaded = [m for m in HARNESS if m in sys.modules]
bilevel.tasks.tasks_available()  # the harness still loads on first use
print(json.dumps({"torch": after_torch, "bilevel": after_bilevel, "loaded": loaded,
                  "tasks_loaded_on_use": "bilevel.tasks" in sys.modules}))
"""


def _probe() -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    code = f"HARNESS = {HARNESS!r}\n{PROBE}"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_import_loads_no_harness_and_little_memory():
    found = _probe()
    assert found["loaded"] == [], f"import bilevel loaded {found['loaded']}"
    assert found["tasks_loaded_on_use"]
    extra = found["bilevel"] - found["torch"]
    assert extra <= 20.0, f"import bilevel adds {extra:.1f} MB resident over import torch"
