"""The team supervisor is process management, not a flow: importing it loads no module of
`components` or `flows` (and the CLI reaches it through a thin `flows/cli/team.py`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)


def test_supervisor_imports_no_components_and_no_flows():
    probe = ("import json, sys; import infra.team.supervisor; "
             "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('components', 'flows'))))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
