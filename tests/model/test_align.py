"""Behaviour of the alignment stage on a synthetic dataset with a planted part-word mapping.

The alignment is trained on the TRAIN split only (images + titles; no truth, no queries,
no qrels). The planted truth is read only to score it: each visual concept's top word must
name the part kind its regions cover (docs/method.md#checked-on-a-planted-mapping).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.align.config import AlignConfig
from components.align.evaluation import alignment_precision_at_1
from components.align.model import AlignmentModel
from components.align.train import train_alignment
from components.data.build import build_dataset
from components.data.config import DataConfig, SyntheticConfig
from components.data.synthetic import load_synthetic_truth
from components.text.encoder import TextEncoder
from components.vision.cache import extract_parts_cached
from components.vision.parts import PartsConfig

pytestmark = pytest.mark.slow

ISSUE_TARGET = 0.8  # concept-to-word precision@1 the issue asks for


class Synthetic:
    def __init__(self, root: Path, features, truth: dict, ads: pd.DataFrame, encoder, tmp: Path):
        self.root, self.features, self.truth, self.ads = root, features, truth, ads
        self.encoder, self.tmp = encoder, tmp
        self.ad_ids = list(ads["ad_id"])
        self.train = np.flatnonzero(ads["split"].to_numpy() == "train")
        self.held_out = np.flatnonzero(ads["split"].to_numpy() != "train")

    def train_model(self, name: str, **overrides):
        cfg = AlignConfig(**overrides)
        result = train_alignment(cfg, texts=list(self.ads["title"].iloc[self.train]),
                                 parts=self.features.take(self.train), encoder=self.encoder,
                                 out_dir=self.tmp / name)
        return result, AlignmentModel.load(result.model_dir)

    def score(self, model: AlignmentModel, rows: np.ndarray | None = None, **kwargs) -> dict:
        rows = np.arange(len(self.ads)) if rows is None else rows
        return alignment_precision_at_1(model, self.features.take(rows), self.truth,
                                        [self.ad_ids[i] for i in rows], **kwargs)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Synthetic:
    tmp = tmp_path_factory.mktemp("align")
    root = tmp / "dataset"
    build_dataset(DataConfig(source="synthetic", out_dir=root, seed=0, max_ads=None,
                             synthetic=SyntheticConfig(num_ads=300, image_size=160)))
    ads = pd.read_parquet(root / "ads.parquet")
    features = extract_parts_cached([root / p for p in ads["image_path"]], PartsConfig(),
                                    cache_dir=tmp / "features", progress=False)
    encoder = TextEncoder(cache_dir=tmp / "text")
    return Synthetic(root, features, load_synthetic_truth(root), ads, encoder, tmp)


@pytest.fixture(scope="module")
def trained(synthetic):
    """The default method: the per-word head over the pooled vector, cross-fitted."""
    return synthetic.train_model("full")


def test_alignment_recovers_the_planted_mapping(synthetic, trained):
    result, model = trained
    scores = synthetic.score(model)
    assert scores["num_concepts_scored"] >= 20
    assert scores["precision@1"] >= ISSUE_TARGET, scores
    # Images the alignment never saw: their top word names a part they show.
    held_out = synthetic.score(model, synthetic.held_out)
    assert held_out["translate_precision@1"] >= 0.75, held_out
    assert result.metrics["seconds_total"] > 0 and result.metrics["folds"] == 5


def test_alignment_is_clearly_above_controls(synthetic, trained):
    _, model = trained
    full = synthetic.score(model)["precision@1"]
    # Control 1: the same concept words, shuffled across concepts (no signal, same words).
    words = [ws[0][0] for ws in model.concept_words(top=1)]
    rng = np.random.default_rng(0)
    shuffled = synthetic.score(model, concept_words=list(rng.permutation(words)))["precision@1"]
    # Control 2: the same pipeline trained on titles shuffled across images (no pairing).
    titles = list(synthetic.ads["title"].iloc[synthetic.train])
    order = np.random.default_rng(1).permutation(len(titles))
    result = train_alignment(AlignConfig(), texts=[titles[i] for i in order],
                             parts=synthetic.features.take(synthetic.train), encoder=synthetic.encoder,
                             out_dir=synthetic.tmp / "unpaired")
    unpaired = synthetic.score(AlignmentModel.load(result.model_dir))["precision@1"]
    assert shuffled <= 0.3 and unpaired <= 0.3, (shuffled, unpaired)
    assert full - max(shuffled, unpaired) >= 0.5


def test_out_of_fold_words_are_worse_than_in_sample_ones(synthetic, trained):
    """Cross-fitting is real: the training ads' out-of-fold logits fit their own titles less
    well than the full model's in-sample logits do."""
    result, model = trained
    z, mask = model.instances(synthetic.features.take(synthetic.train))
    from components.align.head import predict_logits
    from components.align.train import word_labels

    labels = word_labels(list(synthetic.ads["title"].iloc[synthetic.train]),
                         {w: i for i, w in enumerate(model.words)}, AlignConfig().vocab_min_length)
    in_sample = predict_logits(model.head, z, mask)
    assert result.out_of_fold_logits.shape == in_sample.shape
    assert not np.allclose(result.out_of_fold_logits, in_sample)
    top_in = labels[np.arange(len(labels)), in_sample.argmax(1)].mean()
    top_oof = labels[np.arange(len(labels)), result.out_of_fold_logits.argmax(1)].mean()
    assert top_in > top_oof


def test_saved_model_translates_identically(synthetic, trained, tmp_path):
    _, model = trained
    rows = synthetic.held_out[:20]
    before = model.translate(synthetic.features.take(rows))
    reloaded = AlignmentModel.load(model.save(tmp_path / "copy"))
    after = reloaded.translate(synthetic.features.take(rows))
    assert [[w.word for w in ws] for ws in after] == [[w.word for w in ws] for ws in before]
    assert [[w.part for w in ws] for ws in after] == [[w.part for w in ws] for ws in before]
    np.testing.assert_allclose([w.score for ws in after for w in ws], [w.score for ws in before for w in ws],
                               rtol=1e-6)
    assert reloaded.concept_words() == model.concept_words()
    assert reloaded.words_shown == model.words_shown == AlignConfig().words_shown
    assert not any(p.suffix in (".pkl", ".pt", ".pickle") for p in (tmp_path / "copy").iterdir())


def test_training_is_deterministic_by_seed(synthetic, trained):
    result, model = trained
    again_result, again = synthetic.train_model("again")
    rows = synthetic.held_out[:30]
    assert again.translate(synthetic.features.take(rows)) == model.translate(synthetic.features.take(rows))
    np.testing.assert_array_equal(again_result.out_of_fold_logits, result.out_of_fold_logits)


def test_align_compare_scores_each_variant_through_a_shared_text_matcher(synthetic, tmp_path):
    from components.config import parse_variant
    from components.evaluate.align_compare import TABLE_FILE, compare_alignments
    from components.match.config import MatchConfig

    variants = [parse_variant("clicks:"), parse_variant("titles:click_text=false,c=0.3")]
    assert variants[1].overrides == {"click_text": False, "c": 0.3}
    match_cfg = MatchConfig(lr=1e-4, max_steps=4, eval_every=2, batch_size=16, word_channel_weights=[0.0, 1.0])
    table = compare_alignments(variants, align_cfg=AlignConfig(max_iter=20), match_cfg=match_cfg,
                               dataset_dir=synthetic.root, features=synthetic.features, out_dir=tmp_path,
                               cache_dir=synthetic.tmp)
    assert list(table["variant"]) == ["clicks", "titles"]
    assert (tmp_path / TABLE_FILE).exists()
    for column in ("visual_word_precision", "valid/ndcg@10", "test/all/ndcg@10", "test/image_only/ndcg@10"):
        assert table[column].between(0, 1).all(), column
    assert set(table["channel_weight"]) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="pooling"):
        compare_alignments([parse_variant("bad:pooling=nope")], align_cfg=AlignConfig(max_iter=20),
                           match_cfg=match_cfg, dataset_dir=synthetic.root, features=synthetic.features,
                           out_dir=tmp_path / "bad", cache_dir=synthetic.tmp)
    with pytest.raises(ValueError, match="key=value"):
        parse_variant("broken:pca_dim")
