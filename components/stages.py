"""The code each pipeline stage runs: one list per stage, read by the Prefect flow (its cache
keys) and by `dvc.yaml` (its `deps`), so both invalidate on exactly the same edits.

A stage is named by the module(s) holding its function (`STAGE_MODULES`); the code it runs is
the closure of what those modules import inside `components/` (found by reading the sources,
imports inside functions included, package `__init__` files included because importing a
module runs them). A docstring change in `components/search/service.py` then leaves the
alignment's key alone, and an edit to `components/data/validate.py` invalidates validation.

    python -m components.stages           # print each stage's code list
    python -m components.stages --write   # rewrite the code deps of dvc.yaml from it
"""

from __future__ import annotations

import ast
import hashlib
import sys
from functools import cache
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "components"

# stage -> the modules whose functions the stage calls (the CLI command, the flow task and the
# dvc.yaml stage of that name all call these).
STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "build_data": ("components.data.build",),
    "validate": ("components.data.validate",),
    "features": ("components.vision.stage",),
    "align": ("components.align.stage",),
    "train_matcher": ("components.match.stage",),
    "evaluate": ("components.evaluate.stage",),
    # registration: the search bundle and the MLflow model built from it (flow only, no DVC stage)
    "register": ("components.search.bundle", "components.catalogue.pyfunc", "components.registry.versions"),
}


def _module_file(module: str, root: Path) -> Path | None:
    base = root.joinpath(*module.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _imports(path: Path) -> set[str]:
    """Modules of `components` that the source at `path` imports (anywhere in the file)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from components.vision import parts` imports a submodule
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name == PACKAGE or name.startswith(PACKAGE + ".")}


@cache
def _closure(modules: tuple[str, ...], root: Path) -> tuple[str, ...]:
    seen: set[Path] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        # importing a.b.c runs a/__init__.py and a/b/__init__.py first
        for depth in range(1, len(parts) + 1):
            path = _module_file(".".join(parts[:depth]), root)
            if path is None or path in seen:
                continue
            seen.add(path)
            todo.extend(_imports(path))
    return tuple(sorted(p.relative_to(root).as_posix() for p in seen))


def module_code(modules: tuple[str, ...], root: Path = REPO_ROOT) -> list[str]:
    """The repo-relative source files of `modules` (any package, e.g. a flow helper) and of
    everything they import inside `components/`, sorted."""
    return list(_closure(tuple(modules), Path(root)))


def stage_code(stage: str, root: Path = REPO_ROOT) -> list[str]:
    """The repo-relative source files `stage` runs (sorted): its `dvc.yaml` code deps."""
    if stage not in STAGE_MODULES:
        raise KeyError(f"unknown stage {stage!r}; stages: {', '.join(STAGE_MODULES)}")
    return module_code(STAGE_MODULES[stage], root)


def files_version(names: list[str], root: Path = REPO_ROOT) -> str:
    """A hash of the names and contents of the repo-relative files `names`."""
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode() + b"\0")
        digest.update((Path(root) / name).read_bytes())
    return digest.hexdigest()[:16]


def stage_code_version(stage: str, root: Path = REPO_ROOT) -> str:
    """A hash of the names and contents of `stage_code(stage)`: part of the stage's cache key."""
    return files_version(stage_code(stage, root), root)


def dvc_code_deps(dvc_yaml: dict) -> dict[str, list[str]]:
    """stage -> its deps inside `components/`, as `dvc.yaml` declares them."""
    return {name: sorted(d for d in stage.get("deps", []) if str(d).startswith(PACKAGE + "/"))
            for name, stage in (dvc_yaml.get("stages") or {}).items()}


def write_dvc_deps(dvc_path: Path, root: Path = REPO_ROOT) -> bool:
    """Replace the `components/` deps of every stage in `dvc_path` with `stage_code`, keeping
    the other lines (data deps, comments) as they are. Returns whether the file changed."""
    lines = Path(dvc_path).read_text().splitlines(keepends=True)
    out: list[str] = []
    stage = None
    in_deps = False
    for line in lines:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if indent == 2 and stripped.endswith(":") and not stripped.startswith("-"):
            stage, in_deps = stripped[:-1], False
        elif indent == 4 and stripped.endswith(":"):
            in_deps = stripped == "deps:"
            out.append(line)
            if in_deps and stage in STAGE_MODULES:
                out += [f"      - {name}\n" for name in stage_code(stage, root)]
            continue
        if in_deps and stripped.startswith(f"- {PACKAGE}/"):
            continue  # replaced above
        out.append(line)
    text = "".join(out)
    changed = text != Path(dvc_path).read_text()
    if changed:
        Path(dvc_path).write_text(text)
    return changed


if __name__ == "__main__":
    if "--write" in sys.argv[1:]:
        path = REPO_ROOT / "dvc.yaml"
        print(f"{path}: {'updated' if write_dvc_deps(path) else 'already up to date'}")
    else:
        for name in STAGE_MODULES:
            print(f"{name} ({stage_code_version(name)}):")
            for file in stage_code(name):
                print(f"  {file}")
