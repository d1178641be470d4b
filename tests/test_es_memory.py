"""ESJ's memory does not grow with the number of inner steps N; itd's does.

Torch's CPU tensors are invisible to tracemalloc, so the test reads the peak resident set
(``VmHWM`` in /proc/self/status, reset before each run through /proc/self/clear_refs) in a
fresh subprocess; ``ru_maxrss`` would not do, a child inherits its parent's peak. Large
allocations are forced onto mmap (``MALLOC_MMAP_THRESHOLD_``) so freed memory leaves the
resident set at once. ESJ's extra peak at N = 200 must be within 10% of N = 10; itd's must grow
with N (its graph holds every step).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = r"""
import json, torch
import bilevel as bl

torch.manual_seed(0)
torch.set_num_threads(1)
n, p, h = 8, 16, 128
X, t = torch.randn(n, p, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
Xv, tv = torch.randn(n, p, dtype=torch.float64), torch.randn(n, dtype=torch.float64)

def net(y, inputs):
    hidden = torch.tanh(inputs @ y["w1"] + y["b1"])
    hidden = torch.tanh(hidden @ y["w2"] + y["b2"])
    return hidden @ y["w3"]

def lower(x, y, b):
    decay = sum(v.square().sum() for v in y.values())
    return torch.mean((net(y, X * x["scale"]) - t) ** 2) + 1e-3 * decay

def upper(x, y, b):
    return torch.mean((net(y, Xv * x["scale"]) - tv) ** 2)

problem = bl.Problem(upper=upper, lower=lower)
x = {"scale": torch.ones(p, dtype=torch.float64)}
f64 = torch.float64
y = {"w1": torch.randn(p, h, dtype=f64) / p**0.5, "b1": torch.zeros(h, dtype=f64),
     "w2": torch.randn(h, h, dtype=f64) / h**0.5, "b2": torch.zeros(h, dtype=f64),
     "w3": torch.randn(h, dtype=f64) / h**0.5}

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024

def run(name, steps, **options):
    # peak resident memory above the resident memory before the call, in MB
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident set
    before = status("VmRSS")
    bl.hypergrad(problem, x, y, bl.method(name, inner_steps=steps, inner_lr=0.05, **options))
    return status("VmHWM") - before

run("esj", 1, directions=64)  # load code paths (lazy imports) before measuring
run("itd", 1)
out = {name: run(*args, **kw) for name, args, kw in [
    ("esj10", ("esj", 10), {"directions": 64}),
    ("esj200", ("esj", 200), {"directions": 64}),
    ("itd10", ("itd", 10), {}),
    ("itd200", ("itd", 200), {}),
]}
print(json.dumps(out))
"""


def test_esj_memory_flat_in_inner_steps_while_itd_grows():
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    mb = json.loads(done.stdout.strip().splitlines()[-1])
    assert mb["esj10"] > 5, f"ESJ's footprint is too small to measure: {mb}"
    assert mb["esj200"] <= 1.1 * mb["esj10"], f"ESJ memory grew with N: {mb}"
    assert mb["itd200"] > 5 + 5 * max(mb["itd10"], 0.0), f"itd's memory should grow with N: {mb}"
