"""Warm start of the matcher (components/match/systems.py): a saved matcher (the loop's
champion) is the starting point of the next fine-tune, at the rate it trained with, for
`match.warm_start_steps` steps; settings that change its tensors or what they mean refuse it.

Real training on a tiny synthetic dataset (CPU, a few steps); the word channel reads random
word evidence whose vocabulary differs between the champion and the warm run, as it does when
the alignment is fitted again on the next dataset version."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from components.match.config import MatchConfig
from components.match.scorers import SCORER_FILE, WEIGHTS_FILE, read_meta
from components.match.systems import (
    WarmStartRefused,
    check_warm_start,
    init_matcher,
    train_system,
)
from components.match.words import WordChannel

pytestmark = pytest.mark.slow

TINY = dict(lr=3e-4, max_steps=4, eval_every=2, batch_size=16, warm_start_steps=2, device="cpu")
CALIBRATION = {f"word_channel.{b}" for b in WordChannel.CALIBRATION_BUFFERS}


def _with_evidence(data, vocabulary: list[str], seed: int):
    """`data` whose ads carry random word evidence over `vocabulary` (what the channel reads)."""
    rng = np.random.default_rng(seed)
    evidence = rng.normal(size=(len(data.ads.ad_ids), len(vocabulary))).astype(np.float32)
    words = [[(vocabulary[0], 1.0)] for _ in data.ads.ad_ids]
    return replace(data, ads=replace(data.ads, evidence=evidence, evidence_words=list(vocabulary), words=words))


@pytest.fixture(scope="module")
def splits(synthetic_dataset_dir):
    from components.data.format import read_dataset
    from components.match.stage import split_data

    dataset = read_dataset(synthetic_dataset_dir)
    return {name: split_data(dataset, name, features=None, words=None) for name in ("train", "valid")}


@pytest.fixture(scope="module")
def champion(splits, tmp_path_factory):
    """`ours` trained cold (lr 3e-4, 4 steps) with a word channel over a 3-word vocabulary."""
    root = tmp_path_factory.mktemp("champion")
    vocabulary = ["red", "car", "tree"]
    train = _with_evidence(splits["train"], vocabulary, 0)
    valid = _with_evidence(splits["valid"], vocabulary, 1)
    train_system("ours", MatchConfig(**TINY), train, valid, root)
    return root / "scorer"


def test_a_warm_start_takes_the_champions_tensors_and_rate(champion, splits):
    cfg = MatchConfig(**{**TINY, "lr": None})  # a cold run would search lr_grid
    warm = check_warm_start("ours", cfg, champion, "alignsearch v1")
    assert warm.lr == 3e-4 == read_meta(champion)["info"]["lr"]
    assert warm.steps == 2 and warm.source == "alignsearch v1"

    # The next version's alignment has another vocabulary: the channel's learned weight loads,
    # its calibration (fitted on the old ads) does not.
    train = _with_evidence(splits["train"], ["red", "car", "boat", "sun"], 2)
    module = init_matcher("ours", cfg, warm.lr, train, max_steps=warm.steps, warm_start=warm)
    saved = load_file(str(champion / WEIGHTS_FILE))
    started = module.net.trainable_state_dict()
    assert set(started) - CALIBRATION == set(saved) - CALIBRATION
    for key in set(saved) - CALIBRATION:
        torch.testing.assert_close(started[key], saved[key], atol=0, rtol=0, msg=key)
    assert float(saved["word_channel.calibrated_weight"]) > 0 or saved["word_channel.text_covariance"].any()
    assert not module.net.word_channel.calibrated  # calibrated again after this training

    cold = init_matcher("ours", cfg, 1e-4, train, max_steps=4)
    top = next(k for k in saved if k.startswith("tower."))
    assert not torch.equal(cold.net.trainable_state_dict()[top], saved[top])  # the pretrained encoder


def test_warm_training_runs_its_steps_at_the_champions_rate(champion, splits, tmp_path):
    cfg = MatchConfig(**{**TINY, "lr": None, "lr_grid": [1e-5, 1e-3]})
    warm = check_warm_start("ours", cfg, champion, "alignsearch v1")
    train = _with_evidence(splits["train"], ["red", "car", "tree"], 0)
    valid = _with_evidence(splits["valid"], ["red", "car", "tree"], 1)
    scorer = train_system("ours", cfg, train, valid, tmp_path, warm_start=warm)
    info = scorer.info
    assert info["lr"] == 3e-4 and info["steps"] == 2  # no search of lr_grid, warm_start_steps steps
    assert info["warm_start"] == {"source": "alignsearch v1", "lr": 3e-4, "steps": 2}
    assert not any(p.name.startswith("lr-") for p in tmp_path.iterdir())
    assert (tmp_path / "warm" / "scorer" / SCORER_FILE).is_file()
    # what it saves is a warm start's own next starting point: the rate travels on
    assert check_warm_start("ours", cfg, tmp_path / "scorer", "alignsearch v2").lr == 3e-4


@pytest.mark.parametrize(("system", "change", "reason"), [
    ("text_only", {}, "is ours, this run trains text_only"),
    ("late_fusion", {}, "late_fusion is not fine-tuned"),
    ("ours", {"trainable_layers": 3}, "tower.trainable_layers 2 (this run: 3)"),
    ("ours", {"words_per_ad": 3}, "words_per_ad 5 (this run: 3)"),
    ("ours", {"word_channel": False}, "word_channel True (this run: False)"),
    ("ours", {"max_query_len": 24}, "tower.max_query_len 16 (this run: 24)"),
])
def test_what_does_not_fit_refuses_with_the_reason(champion, system, change, reason):
    with pytest.raises(WarmStartRefused) as refused:
        check_warm_start(system, MatchConfig(**{**TINY, **change}), champion, "alignsearch v1")
    assert reason in str(refused.value)


def test_a_champion_without_its_rate_or_weights_refuses(champion, tmp_path):
    import json
    import shutil

    copy = tmp_path / "scorer"
    shutil.copytree(champion, copy)
    meta = json.loads((copy / SCORER_FILE).read_text())
    del meta["info"]["lr"]
    (copy / SCORER_FILE).write_text(json.dumps(meta))
    with pytest.raises(WarmStartRefused, match="does not record the learning rate"):
        check_warm_start("ours", MatchConfig(**TINY), copy, "v1")
    (copy / WEIGHTS_FILE).unlink()
    with pytest.raises(WarmStartRefused, match="no trained weights"):
        check_warm_start("ours", MatchConfig(**TINY), copy, "v1")
    with pytest.raises(WarmStartRefused, match="no readable matcher"):
        check_warm_start("ours", MatchConfig(**TINY), tmp_path / "nothing", "v1")
