"""One process set-up (flows/runtime.py) for every entry point: the CLI calls it, and so do the
flows themselves, so a run started by a prefect.yaml deployment's worker (no CLI involved)
gets the same offline environment and the same pinned CPU kernels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from flows.runtime import OFFLINE_ENV

REPO_ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import json, os, sys
import flows.promote as promote, flows.retrain as retrain
entry = {"retrain_and_promote": lambda: promote.retrain_and_promote_flow.fn("/nonexistent.yaml", ["nope.x=1"]),
         "retrain": lambda: retrain.retrain_flow.fn({"nope": 1})}[sys.argv[1]]
assert "torch" not in sys.modules  # importing the flows must not load torch (the kernels are fixed at its import)
try:
    entry()
except Exception as exc:  # invalid params on purpose: only what the flow set up first matters
    print("raised", type(exc).__name__, file=sys.stderr)
import torch
print(json.dumps({"env": {k: os.environ.get(k) for k in %r}, "kernels": torch.backends.cpu.get_cpu_capability()}))
"""


def test_flows_set_up_the_runtime_without_the_cli(entry: str = "retrain_and_promote"):
    """The prefect.yaml entry point (it calls retrain_flow, which sets up too)."""
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_ENV}
    out = subprocess.run([sys.executable, "-c", CHILD % (list(OFFLINE_ENV),), entry], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "raised" in out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["env"] == OFFLINE_ENV
    assert seen["kernels"] == "AVX2" or "avx2" not in open("/proc/cpuinfo").read()
