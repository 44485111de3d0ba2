"""Dataset versioning with DVC: the project set-up, `repro`/`push`, and the hash runs log.

DVC is driven through its command line (the stable interface) with the interpreter that
runs alignsearch, so the venv's DVC is used whatever is on PATH.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import yaml

log = logging.getLogger(__name__)


class DvcError(RuntimeError):
    """A DVC command failed; the message carries its output."""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DVC_NO_ANALYTICS", "1")
    # Stage commands call `alignsearch`: make the running venv's scripts visible to them.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_dvc(args: list[str], repo_root: Path, *, capture: bool = True) -> str:
    """Run `dvc ARGS` in `repo_root`; raise `DvcError` with its output on failure."""
    cmd = [sys.executable, "-m", "dvc", *args]
    proc = subprocess.run(
        cmd, cwd=repo_root, env=_env(), text=True,
        stdout=subprocess.PIPE if capture else None, stderr=subprocess.STDOUT if capture else None,
    )
    if proc.returncode != 0:
        raise DvcError(f"`dvc {' '.join(args)}` failed in {repo_root} (exit {proc.returncode}):\n{proc.stdout or ''}")
    return proc.stdout or ""


def ensure_dvc_project(repo_root: Path, remote_name: str, remote_dir: Path) -> None:
    """Make `repo_root` a DVC project with analytics off and a default local remote.

    Idempotent: an existing project keeps its settings; a missing default remote is added
    (relative `remote_dir` is taken from `repo_root`).
    """
    repo_root = Path(repo_root)
    if not (repo_root / ".dvc").is_dir():
        no_scm = [] if (repo_root / ".git").exists() else ["--no-scm"]
        run_dvc(["init", "-q", *no_scm], repo_root)
        run_dvc(["config", "core.analytics", "false"], repo_root)
    remotes = run_dvc(["remote", "list"], repo_root)
    if not any(line.split()[0] == remote_name for line in remotes.splitlines() if line.strip()):
        run_dvc(["remote", "add", "-d", remote_name, str(remote_dir)], repo_root)
    remote_path = Path(remote_dir) if Path(remote_dir).is_absolute() else repo_root / remote_dir
    remote_path.mkdir(parents=True, exist_ok=True)


def dvc_output_hash(repo_root: Path, out_path: Path | str) -> str | None:
    """The md5 DVC recorded in `dvc.lock` for a stage output, or None when not tracked."""
    lock_path = Path(repo_root) / "dvc.lock"
    if not lock_path.is_file():
        return None
    lock = yaml.safe_load(lock_path.read_text()) or {}
    wanted = Path(out_path).as_posix().rstrip("/")
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if Path(out.get("path", "")).as_posix().rstrip("/") == wanted:
                return out.get("md5")
    return None
