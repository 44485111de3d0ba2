"""The `alignsearch` CLI: help, build, validate, and a broken dataset failing loudly."""

from __future__ import annotations

import re
import shutil

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


COMMANDS = {"ads", "align", "bench-index", "bench-serve", "benchmark", "benchmark-loop", "data", "evaluate", "features", "promote", "retrain", "rollback", "run",
            "schedule", "search", "serve", "team", "traffic", "train-matcher"}
SUBCOMMANDS = {"ads": {"add", "remove", "status"}, "data": {"build", "hash", "validate"}, "align": {"compare", "show", "train"}, "team": {"down", "status", "up"},
               "traffic": {"compare", "export", "import", "ingest", "prune", "report", "simulate"}}


def _listed(help_text: str) -> set[str]:
    """The command names in the Commands panel of a --help (the first word of each row)."""
    panel = help_text.split("Commands")[-1]
    return set(re.findall(r"^│ ([a-z][a-z-]*) ", panel, flags=re.MULTILINE))


def test_help_lists_exactly_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert _listed(result.output) == COMMANDS
    assert set(typer.main.get_command(app).commands) == COMMANDS
    for group, expected in SUBCOMMANDS.items():
        group_help = runner.invoke(app, [group, "--help"])
        assert group_help.exit_code == 0 and _listed(group_help.output) == expected


def test_build_then_validate_synthetic(tmp_path):
    out = tmp_path / "syn"
    result = runner.invoke(app, ["data", "build", "--source", "synthetic", "--out", str(out),
                                 "--set", "data.synthetic.num_ads=40", "--set", "data.synthetic.image_size=64",
                                 "--set", f"data.cache_dir={tmp_path / 'cache'}"])
    assert result.exit_code == 0, result.output
    assert (out / "README.txt").is_file() and "ads" in result.output
    result = runner.invoke(app, ["data", "validate", str(out), "--report-dir", str(tmp_path / "reports")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "reports" / "validation.json").is_file()


def test_validate_broken_copy_fails_and_names_the_problem(synthetic_dataset_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(synthetic_dataset_dir, broken)
    ads = pd.read_parquet(broken / "ads.parquet")
    victim = ads["image_path"].iloc[0]
    (broken / victim).unlink()
    result = runner.invoke(app, ["data", "validate", str(broken), "--report-dir", str(tmp_path / "reports")])
    assert result.exit_code == 1
    assert victim in result.output


def test_invalid_override_is_a_usage_error(tmp_path):
    result = runner.invoke(app, ["data", "build", "--set", "data.max_ads=-3", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "max_ads" in result.output


def test_missing_svg_root_says_what_to_install(tmp_path):
    result = runner.invoke(app, ["data", "build", "--source", "openclipart", "--svg-root", str(tmp_path / "none"),
                                 "--out", str(tmp_path / "oc")])
    assert result.exit_code == 1
    assert "openclipart-svg" in result.output


DATASET_COMMANDS = [
    ["data", "hash", "{f}"],
    ["features", "--data", "{f}"],
    ["align", "train", "--data", "{f}", "--features", "{d}"],
    ["align", "show", "--data", "{f}"],
    ["align", "compare", "--data", "{f}", "--out", "{o}"],
    ["train-matcher", "--data", "{f}", "--features", "{d}"],
    ["evaluate", "--data", "{f}", "--features", "{d}"],
    ["benchmark", "--data", "{f}", "--out", "{o}"],
]


@pytest.mark.parametrize("command", DATASET_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_a_file_given_as_dataset_is_a_one_line_error(tmp_path, command):
    """A dataset path that is a file (or a missing input) is exit 2 with one line, not a traceback."""
    not_a_dir = tmp_path / "dataset.txt"
    not_a_dir.write_text("not a dataset\n")
    args = [a.format(f=not_a_dir, d=tmp_path / "missing", o=tmp_path / "out") for a in command]
    result = runner.invoke(app, [*args, "--set", f"paths.reports_dir={tmp_path / 'reports'}"]
                           if command[0] == "evaluate" else args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and (str(not_a_dir) in error[0] or str(tmp_path / "missing") in error[0]), result.output
    assert not (tmp_path / "out").exists()  # nothing of an output directory is touched for bad input


def test_serve_refuses_a_non_loopback_host_unless_allowed(tmp_path, monkeypatch):
    monkeypatch.delenv("ALIGNSEARCH_API_KEY", raising=False)
    store = ["--set", f"registry.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
             "--model-uri", "models:/alignsearch@nobody"]
    refused = runner.invoke(app, ["serve", "--host", "0.0.0.0", *store])
    assert refused.exit_code == 2 and "--allow-remote" in refused.output
    # allowed: warned that nothing authenticates (then it fails on the missing model, exit 1)
    allowed = runner.invoke(app, ["serve", "--host", "0.0.0.0", "--allow-remote", *store])
    assert allowed.exit_code == 1 and "NO authentication" in allowed.output
    monkeypatch.setenv("ALIGNSEARCH_API_KEY", "k")
    keyed = runner.invoke(app, ["serve", "--host", "0.0.0.0", "--allow-remote", *store])
    assert "API key" in keyed.output and "NO authentication" not in keyed.output
