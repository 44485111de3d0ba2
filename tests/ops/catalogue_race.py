"""Catalogue changes racing each other and a promotion, on a tracking server (importable: the
tests' directory is on sys.path; tests/ops and tests/team both run it).

`alignsearch ads add` runs as real CLI processes against `models:/<name>@champion`; the
promotion runs in the test's process, so two points of it can be held still while an
`ads add` goes on: right after it read the champion's live catalogue to re-encode it (the
re-indexing's first `encode_ads`), and right before `champion` moves. Every ad an `ads add`
acknowledged (exit 0) must be in the new champion's catalogue at the end."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

REPO_ROOT = Path(__file__).resolve().parents[2]


def new_ads_dir(dataset_dir: Path, out_dir: Path, picks: list[tuple[str, str, str]]) -> Path:
    """A folder of new ads: (new ad id, title, id of the dataset ad whose image it reuses), as
    tests/catalogue/conftest.py makes them."""
    ads = pd.read_parquet(dataset_dir / "ads.parquet").set_index("ad_id")
    (out_dir / "images").mkdir(parents=True)
    rows = []
    for new_id, title, source_id in picks:
        source = dataset_dir / ads.loc[source_id, "image_path"]
        name = f"images/{new_id.replace(':', '-')}{source.suffix}"
        shutil.copyfile(source, out_dir / name)
        rows.append({"ad_id": new_id, "title": title, "image_path": name})
    pd.DataFrame(rows).to_parquet(out_dir / "ads.parquet", index=False)
    return out_dir


@dataclass
class AdsAdd:
    """One `alignsearch ads add` process, its output in a file."""

    ad_id: str
    process: subprocess.Popen
    log_path: Path

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_until(self, ready: Callable[[str], bool], timeout_s: float = 300.0) -> None:
        """Until the process exits or its output satisfies `ready`."""
        deadline = time.monotonic() + timeout_s
        while self.process.poll() is None and not ready(self.output()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ads add {self.ad_id}: neither done nor ready after {timeout_s:.0f} s:\n"
                                   f"{self.output()[-3000:]}")
            time.sleep(0.3)

    def acknowledged(self, timeout_s: float = 600.0) -> bool:
        """Wait for the end; True when it said the ad was added (exit 0)."""
        self.process.wait(timeout=timeout_s)
        return self.process.returncode == 0 and "Added 1" in self.output()


@dataclass
class Race:
    model_name: str
    dataset_dir: Path
    work_dir: Path
    cache_dir: Path
    env: dict[str, str]
    started: list[AdsAdd] = field(default_factory=list)

    def ads_add(self, ad_id: str) -> AdsAdd:
        """Start `alignsearch ads add` of one new ad (an image of the dataset's first ads)."""
        ads = pd.read_parquet(self.dataset_dir / "ads.parquet")
        source = ads["ad_id"].iloc[len(self.started) % len(ads)]
        folder = new_ads_dir(self.dataset_dir, self.work_dir / ad_id.replace(":", "-"), [(ad_id, "zenko offer", source)])
        log_path = self.work_dir / f"{ad_id.replace(':', '-')}.log"
        command = [sys.executable, "-m", "flows.cli", "ads", "add", str(folder),
                   "--model-uri", f"models:/{self.model_name}@champion",
                   "--set", f"data.cache_dir={self.cache_dir}", "--set", f"registry.model_name={self.model_name}"]
        with log_path.open("w") as log:
            process = subprocess.Popen(command, cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        added = AdsAdd(ad_id, process, log_path)
        self.started.append(added)
        return added

    def acknowledged(self) -> list[str]:
        """The ad ids whose `ads add` said they were added (after waiting for every one)."""
        done = [a.ad_id for a in self.started if a.acknowledged()]
        return done


def waiting_on_a_lock(output: str) -> bool:
    return "waiting" in output and "is running" in output


def two_adds_at_once(race: Race) -> None:
    """Two `ads add` started together; both must be acknowledged."""
    pair = [race.ads_add("race:together-1"), race.ads_add("race:together-2")]
    for added in pair:
        assert added.acknowledged(), f"ads add {added.ad_id} failed:\n{added.output()[-3000:]}"


def adds_during_a_promotion(race: Race, monkeypatch, promote: Callable[[], object]) -> object:
    """Run `promote()` (in this process) with an `ads add` let through right after the
    re-indexing read the champion's catalogue, and another started right before the alias
    moves (it may wait for the catalogue lock; the promotion then goes on). Returns the decision."""
    from mlflow import MlflowClient

    from components.catalogue import live

    real_encode, real_alias = live.encode_ads, MlflowClient.set_registered_model_alias
    fired: list[str] = []

    def encode_with_an_add_meanwhile(*args, **kwargs):
        if "read" not in fired:  # the re-indexing's first encoding: the champion's catalogue was read
            fired.append("read")
            added = race.ads_add("race:while-reindexing")
            added.wait_until(waiting_on_a_lock)
        return real_encode(*args, **kwargs)

    def move_with_an_add_meanwhile(self, name, alias, version):
        if alias == "champion" and name == race.model_name and "move" not in fired:
            fired.append("move")
            added = race.ads_add("race:while-moving")
            added.wait_until(waiting_on_a_lock)
        return real_alias(self, name, alias, version)

    monkeypatch.setattr(live, "encode_ads", encode_with_an_add_meanwhile)
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", move_with_an_add_meanwhile)
    try:
        decision = promote()
    finally:
        monkeypatch.setattr(live, "encode_ads", real_encode)
        monkeypatch.setattr(MlflowClient, "set_registered_model_alias", real_alias)
    assert fired == ["read", "move"], fired
    return decision
