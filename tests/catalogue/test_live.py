"""Adding and removing ads changes what search answers, with no retraining: an added ad whose
image shows what the query names is found; a removed one never appears; re-adding an id
replaces it; bad new ads are refused by id with nothing added; every change is a catalogue
version (an MLflow run linked to the model version) that answers carry."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import yaml
from conftest import URI, new_ads_dir
from typer.testing import CliRunner

from components.catalogue import live, versions
from components.data.validate import ValidationError
from components.registry.models import open_model
from components.search.engine import SearchEngine
from flows.cli import app

pytestmark = pytest.mark.slow


def _image_ad(dataset_dir, query: str) -> str:
    """A test-split ad whose image shows `query`'s object (a positive qrel) but whose title does not name it."""
    qrels = pd.read_parquet(dataset_dir / "qrels.parquet")
    ads = pd.read_parquet(dataset_dir / "ads.parquet").set_index("ad_id")
    positives = qrels[(qrels["query_id"].str.endswith(f":{query}")) & (qrels["relevance"] > 0)]["ad_id"]
    for ad_id in positives:
        if query not in ads.loc[ad_id, "title"]:
            return ad_id
    return positives.iloc[0]


def _control_ad(dataset_dir, queries: list[str]) -> str:
    """A test-split ad whose image shows none of `queries`' objects."""
    qrels = pd.read_parquet(dataset_dir / "qrels.parquet")
    ads = pd.read_parquet(dataset_dir / "ads.parquet")
    shown = set(qrels[qrels["query_id"].str.split(":").str[-1].isin(queries) & (qrels["relevance"] > 0)]["ad_id"])
    return next(a for a in ads[ads["split"] == "test"]["ad_id"] if a not in shown)


def _ids(engine, query: str, k: int) -> list[str]:
    return [hit.ad_id for hit in engine.search([query], k)[0]]


def test_added_ads_are_found_removed_ones_never_appear(store, synthetic_dataset_dir, tmp_path):
    root, cfg = store
    cache = cfg.data.cache_dir
    ref = open_model(URI, cache)
    before = live.current_catalogue(ref, cache)
    assert before.version == 0 and versions.pointer(ref.name, ref.version) is None

    queries = ["heart", "star", "leaf"]
    picks = [(f"new:{q}", "zenko offer", _image_ad(synthetic_dataset_dir, q)) for q in queries]
    picks.append(("new:control", "zenko offer", _control_ad(synthetic_dataset_dir, queries)))
    result = live.add_ads(URI, new_ads_dir(synthetic_dataset_dir, tmp_path / "new", picks),
                          validate_cfg=cfg.validation, cache_dir=cache, experiment=cfg.registry.experiment,
                          progress=False)
    added = result.catalogue
    assert sorted(result.added) == ["new:control", "new:heart", "new:leaf", "new:star"] and result.replaced == []
    assert added.version == 1 and len(added) == len(before) + 4 and result.ads_per_second > 0
    assert versions.pointer(ref.name, ref.version) == (added.run_id, 1)

    engine = SearchEngine(ref.bundle_dir, catalogue=live.current_catalogue(ref, cache))
    assert engine.catalogue_version == "v1"
    everything = len(engine)
    for query in queries:
        # Same title for all new ads: only the image can put the one showing the query first.
        hits = engine.search([query], everything)[0]
        ranked = [h.ad_id for h in hits if h.ad_id.startswith("new:")]
        assert ranked[0] == f"new:{query}", (query, ranked)
        assert query in next(h.visual_words for h in hits if h.ad_id == f"new:{query}")
        assert {h.catalogue_version for h in hits} == {"v1"}

    # The run is the catalogue version, linked to the model version and its parent.
    run = versions._client().get_run(added.run_id)
    assert run.data.tags["alignsearch.catalogue.model_version"] == ref.version
    assert run.data.tags["alignsearch.catalogue.version"] == "1"
    assert run.data.metrics["num_added"] == 4

    removed = live.remove_ads(URI, ["new:star", before.ads["ad_id"].iloc[0]], cache_dir=cache,
                              experiment=cfg.registry.experiment).catalogue
    assert removed.version == 2 and removed.parent_run_id == added.run_id
    engine.use_catalogue(live.current_catalogue(ref, cache))
    everything = len(engine)
    for query in ("heart", "star", "leaf", "box"):
        ids = _ids(engine, query, everything)
        assert "new:star" not in ids and before.ads["ad_id"].iloc[0] not in ids
        assert len(ids) == everything
    assert "new:heart" in _ids(engine, "heart", everything)

    with pytest.raises(KeyError, match="no-such-ad"):
        live.remove_ads(URI, ["no-such-ad"], cache_dir=cache, experiment=cfg.registry.experiment)
    assert versions.pointer(ref.name, ref.version)[1] == 2  # nothing changed


def test_re_adding_an_id_replaces_it(store, synthetic_dataset_dir, tmp_path):
    root, cfg = store
    cache = cfg.data.cache_dir
    source = _image_ad(synthetic_dataset_dir, "heart")
    first = live.add_ads(URI, new_ads_dir(synthetic_dataset_dir, tmp_path / "a", [("new:1", "zenko offer", source)]),
                         validate_cfg=cfg.validation, cache_dir=cache, experiment=cfg.registry.experiment,
                         progress=False).catalogue
    again = live.add_ads(URI, new_ads_dir(synthetic_dataset_dir, tmp_path / "b", [("new:1", "lumora bell deal",
                                                                                    source)]),
                         validate_cfg=cfg.validation, cache_dir=cache, experiment=cfg.registry.experiment,
                         progress=False)
    assert again.replaced == ["new:1"] and again.added == []
    assert len(again.catalogue) == len(first) and again.catalogue.version == 2
    row = again.catalogue.ads.set_index("ad_id").loc["new:1"]
    assert row["title"] == "lumora bell deal"
    assert (again.catalogue.ads["ad_id"] == "new:1").sum() == 1


def test_bad_new_ads_are_refused_by_id_and_nothing_is_added(store, synthetic_dataset_dir, tmp_path):
    root, cfg = store
    cache = cfg.data.cache_dir
    source = _image_ad(synthetic_dataset_dir, "heart")
    folder = new_ads_dir(synthetic_dataset_dir, tmp_path / "bad", [("good:1", "zenko", source),
                                                                   ("bad:broken", "zenko", source),
                                                                   ("bad:dupe", "zenko", source)])
    ads = pd.read_parquet(folder / "ads.parquet")
    (folder / "images" / "broken.png").write_bytes(b"not a png")
    ads.loc[1, "image_path"] = "images/broken.png"
    ads = pd.concat([ads, ads.iloc[[2]].assign(image_path="images/missing.png")], ignore_index=True)
    ads.to_parquet(folder / "ads.parquet", index=False)

    with pytest.raises(ValidationError) as caught:
        live.add_ads(URI, folder, validate_cfg=cfg.validation, cache_dir=cache, experiment=cfg.registry.experiment,
                     progress=False)
    message = str(caught.value)
    assert "ad_id must be unique" in message and "bad:dupe" in message
    assert "image must decode" in message and "images/broken.png" in message
    assert "must exist" in message and "images/missing.png" in message
    assert "good:1" not in message
    ref = open_model(URI, cache)
    assert versions.pointer(ref.name, ref.version) is None  # nothing was added
    assert live.current_catalogue(ref, cache).version == 0

    shutil.rmtree(folder / "images")
    (folder / "ads.parquet").unlink()
    with pytest.raises(Exception, match="ads.parquet: file not found"):
        live.add_ads(URI, folder, validate_cfg=cfg.validation, cache_dir=cache, experiment=cfg.registry.experiment)


def test_cli_ads_add_remove_and_search_carry_the_catalogue_version(store, synthetic_dataset_dir, tmp_path):
    root, cfg = store
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True)))
    base = ["--params", str(params)]
    runner = CliRunner()
    folder = new_ads_dir(synthetic_dataset_dir, tmp_path / "new",
                         [("new:heart", "heart heart", _image_ad(synthetic_dataset_dir, "heart"))])
    out = runner.invoke(app, ["ads", "add", str(folder), "--model-uri", URI, *base])
    assert out.exit_code == 0, out.output
    assert "Added 1, replaced 0" in out.output and "catalogue v1" in out.output

    found = runner.invoke(app, ["search", "heart", "-k", "10", "--model-uri", URI, *base], env={"COLUMNS": "300"})
    assert found.exit_code == 0, found.output
    assert "catalogue v1" in found.output and "new:heart" in found.output

    gone = runner.invoke(app, ["ads", "remove", "new:heart", "--model-uri", URI, *base])
    assert gone.exit_code == 0 and "catalogue v2" in gone.output, gone.output
    status = runner.invoke(app, ["ads", "status", "--model-uri", URI, *base])
    assert "catalogue v2" in status.output

    bad = runner.invoke(app, ["ads", "remove", "never-there", "--model-uri", URI, *base])
    assert bad.exit_code == 1 and "never-there" in bad.output


def test_the_pyfunc_answers_from_the_current_catalogue(store, synthetic_dataset_dir, tmp_path):
    import mlflow

    root, cfg = store
    cache = cfg.data.cache_dir
    live.add_ads(URI, new_ads_dir(synthetic_dataset_dir, tmp_path / "new",
                                  [("new:heart", "heart heart", _image_ad(synthetic_dataset_dir, "heart"))]),
                 validate_cfg=cfg.validation, cache_dir=cache, experiment=cfg.registry.experiment, progress=False)
    model = mlflow.pyfunc.load_model(URI, model_config={"cache_dir": str(cache)})
    frame = model.predict(pd.DataFrame({"query": ["heart"], "k": [10]}))
    assert set(frame["catalogue_version"]) == {"v1"} and "new:heart" in frame["ad_id"].tolist()


def test_promotion_reindexes_the_live_catalogue_with_the_new_model(store, synthetic_dataset_dir, tmp_path):
    """`reindex` (called by promotion before `champion` moves): the champion's live ads, every
    one encoded again by the new version. Here v2 is the same model registered again, so the
    re-encoded ads must equal what `ads add` and the bundle computed (training ads excepted:
    the bundle holds their out-of-fold words)."""
    import numpy as np
    from mlflow import MlflowClient

    root, cfg = store
    cache = cfg.data.cache_dir
    name = cfg.registry.model_name
    source = _image_ad(synthetic_dataset_dir, "heart")
    champion = live.add_ads(URI, new_ads_dir(synthetic_dataset_dir, tmp_path / "new", [("new:heart", "zenko", source)]),
                            validate_cfg=cfg.validation, cache_dir=cache, experiment=cfg.registry.experiment,
                            progress=False).catalogue
    client = MlflowClient()
    v1 = client.get_model_version(name, "1")
    tags = {k: v for k, v in v1.tags.items() if not k.startswith(versions.TAG)}  # v2 starts with no catalogue
    client.create_model_version(name, source=v1.source, run_id=v1.run_id, tags=tags)

    assert live.reindex(name, None, "2", cache_dir=cache, experiment=cfg.registry.experiment) is None
    live.catalogue_carrier(cfg.registry, cache)("1", "2")
    carried = live.current_catalogue(open_model(f"models:/{name}/2", cache), cache)
    assert carried.model_version == "2" and carried.version == 1
    assert carried.change["reindexed_from"] == [f"{name} v1 v1 ({champion.run_id})"]
    assert sorted(carried.ads["ad_id"]) == sorted(champion.ads["ad_id"])
    ads = pd.read_parquet(synthetic_dataset_dir / "ads.parquet")
    not_trained = set(ads.loc[ads["split"] != "train", "ad_id"]) | {"new:heart"}
    mine = carried.ads.reset_index().set_index("ad_id").loc[sorted(not_trained), "index"].to_numpy()
    theirs = champion.ads.reset_index().set_index("ad_id").loc[sorted(not_trained), "index"].to_numpy()
    np.testing.assert_allclose(carried.embeddings[mine], champion.embeddings[theirs], atol=1e-4)
    # Again (a promotion completed after a crash): nothing new.
    live.catalogue_carrier(cfg.registry, cache)("1", "2")
    assert versions.pointer(name, "2") == (carried.run_id, 1)
