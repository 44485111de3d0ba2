"""Operations on the live catalogue of a registered model version: open a search engine on
it, add, remove, re-index for a new champion, and keep a running engine on the current version.

    open_engine(uri)         the one way from a model URI to a SearchEngine (bundle + live ads)
    add_ads(uri, dir)        validate -> encode with that version's model -> new version (run)
    remove_ads(uri, ids)     -> new version without them
    reindex(name, a, b)      the live ads of version a encoded by version b (promotion)
    CatalogueWatcher         polls the version's pointer, loads a new version, swaps it in

Encoding happens outside the lock, the change is applied to whatever version is current when
the lock is held (changes are by ad id, so two additions both land), then published with a
compare-and-set on the pointer (`versions.publish`).
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd

from components.catalogue import versions
from components.catalogue.encode import encode_ads
from components.catalogue.images import fill_own_ref, image_name, own_image_ref, resolve_image
from components.catalogue.validate import read_new_ads, validate_new_ads
from components.registry.config import RegistryConfig
from components.registry.models import ModelRef, open_model
from components.registry.versions import training_dataset_dir, version_of_run
from components.search.bundle import bundle_catalogue
from components.search.catalogue import Catalogue
from components.search.engine import SearchEngine

log = logging.getLogger(__name__)

@dataclass
class ChangeResult:
    catalogue: Catalogue
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    encode_seconds: float = 0.0
    ads_per_second: float = 0.0
    step_seconds: dict[str, float] = field(default_factory=dict)


def current_catalogue(ref: ModelRef, cache_dir: Path, *, fresh: bool = True) -> Catalogue:
    """The version's current catalogue: the latest recorded change, or version 0 (its bundle).
    `fresh`: read the pointer from the registry now; else the one `ref` was opened with (a
    one-off search: no MLflow import when the version is cached)."""
    found = versions.pointer(ref.name, ref.version) if fresh else versions.pointer_from_tags(ref.tags)
    if found is None:
        return bundle_catalogue(ref.bundle_dir, model_name=ref.name, model_version=ref.version,
                                dataset_dir=ref.dataset_dir)
    return versions.load_version(found[0], cache_dir)


def open_engine(model_uri: str, *, cache_dir: Path, tracking_uri: str | None = None,
                catalogue: Literal["current", "bundle"] = "current") -> tuple[SearchEngine, ModelRef]:
    """The one way from a model URI to a search engine: the version's bundle (cached locally,
    with its ONNX query tower) over its current live catalogue (`catalogue="bundle"`: the ads
    it was registered with). `tracking_uri`: a local sqlite store answers without MLflow when
    the version and its catalogue are cached. `LookupError` when there is no such version."""
    ref = open_model(model_uri, cache_dir, tracking_uri=tracking_uri)
    if catalogue == "bundle":
        chosen = bundle_catalogue(ref.bundle_dir, model_name=ref.name, model_version=ref.version,
                                  dataset_dir=ref.dataset_dir)
    else:
        chosen = current_catalogue(ref, cache_dir, fresh=False)
    return SearchEngine(ref.bundle_dir, catalogue=chosen), ref


def _encoded_rows(encoded, image_refs: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"ad_id": encoded.ad_ids, "title": encoded.titles,
                         "words": [[w for w, _ in ws] for ws in encoded.words],
                         "scores": [[float(s) for _, s in ws] for ws in encoded.words],
                         "image_ref": image_refs})


def add_ads(model_uri: str, ads_dir: Path, *, validate_cfg, cache_dir: Path, experiment: str,
            progress: bool = True) -> ChangeResult:
    """Validate, encode and add the ads of `ads_dir` (ads.parquet + images/) to the live
    catalogue of the version behind `model_uri`. Any bad row: `ValidationError` naming it,
    nothing added. An ad id already in the catalogue is replaced."""
    ads_dir = Path(ads_dir)
    validate_new_ads(ads_dir, validate_cfg).raise_if_failed()
    ads = read_new_ads(ads_dir)
    ref = open_model(model_uri, cache_dir)
    engine = SearchEngine(ref.bundle_dir, catalogue=current_catalogue(ref, cache_dir))
    encoded = encode_ads(engine, ads, ads_dir, cache_dir=cache_dir, progress=progress,
                         known_word_vectors=engine.catalogue.word_vectors)
    files = [ads_dir / str(p) for p in ads["image_path"]]
    names = [image_name(f) for f in files]
    rows = _encoded_rows(encoded, [own_image_ref(n) for n in names])
    images = dict(zip(names, files, strict=True))
    with versions.catalogue_lock(ref.name):
        base = current_catalogue(ref, cache_dir)
        new = base.changed(added=rows, added_embeddings=encoded.embeddings,
                           added_word_vectors={**engine.catalogue.word_vectors, **encoded.word_vectors})
        metrics = {"encode_seconds": encoded.seconds, "encode_ads_per_second": encoded.ads_per_second}
        published = _publish(new, images, experiment, base.run_id, metrics)
    return ChangeResult(published, published.change["added"], published.change["replaced"], [],
                        encoded.seconds, encoded.ads_per_second, encoded.step_seconds or {})


def remove_ads(model_uri: str, ad_ids: list[str], *, cache_dir: Path, experiment: str) -> ChangeResult:
    """Take `ad_ids` out of the live catalogue (an id that is not in it: `KeyError`, nothing removed)."""
    ref = open_model(model_uri, cache_dir)
    with versions.catalogue_lock(ref.name):
        base = current_catalogue(ref, cache_dir)
        new = base.changed(removed=[str(a) for a in ad_ids])
        published = _publish(new, None, experiment, base.run_id, {})
    return ChangeResult(published, removed=published.change["removed"])


def _publish(catalogue: Catalogue, images, experiment: str, expected_run_id, metrics) -> Catalogue:
    """`versions.publish`, with this version's own image refs filled in once its run exists."""
    original = catalogue.ads["image_ref"].copy()

    def fill(run_id: str) -> None:
        catalogue.ads["image_ref"] = original.map(lambda ref: fill_own_ref(ref, run_id))

    return versions.publish(catalogue, experiment=experiment, images=images, metrics=metrics,
                            expected_run_id=expected_run_id, before_save=fill)


def reindex(name: str, from_version: str | None, to_version: str, *, cache_dir: Path, experiment: str,
            progress: bool = False) -> Catalogue | None:
    """Make the live catalogue of `from_version` (the champion) the catalogue of `to_version`,
    every ad encoded again by `to_version`'s model. None when there is nothing to carry over
    (no champion, or its catalogue is still version 0: the new version serves its own ads).
    An ad whose image cannot be found raises: a promotion must not serve a catalogue that
    another model encoded."""
    if from_version is None:
        return None
    source_ref = open_model(f"models:/{name}/{from_version}", cache_dir)
    source = current_catalogue(source_ref, cache_dir)
    if source.version == 0:
        return None
    target_ref = open_model(f"models:/{name}/{to_version}", cache_dir)
    already = current_catalogue(target_ref, cache_dir)
    if any(str(source.run_id) in item for item in already.change.get("reindexed_from", [])):
        return already  # done by an earlier attempt of this promotion
    files = [resolve_image(str(r), cache_dir) for r in source.ads["image_ref"]]
    lost = [a for a, f in zip(source.ads["ad_id"], files, strict=True) if f is None]
    if lost:
        raise FileNotFoundError(f"re-indexing catalogue {source.label} of {name} v{from_version} for v{to_version}: "
                                f"no image for {len(lost)} ads, e.g. {lost[:5]}; not switched")
    frame = pd.DataFrame({"ad_id": source.ads["ad_id"], "title": source.ads["title"],
                          "image_path": [str(f) for f in files], "split": "test"})
    engine = SearchEngine(target_ref.bundle_dir)
    encoded = encode_ads(engine, frame, Path("/"), cache_dir=cache_dir, progress=progress)
    rows = _encoded_rows(encoded, source.ads["image_ref"].astype(str).tolist())
    with versions.catalogue_lock(name):
        base = current_catalogue(target_ref, cache_dir)
        vectors = {**engine.catalogue.word_vectors, **encoded.word_vectors}
        new = Catalogue(rows, encoded.embeddings, {w: v for w, v in vectors.items()
                                                   if w in {x for ws in rows["words"] for x in ws}},
                        base.index_cfg, base.version + 1, name, str(to_version), None, base.run_id,
                        {"added": [], "replaced": [], "removed": [],
                         "reindexed_from": [f"{name} v{from_version} {source.label} ({source.run_id})"]},
                        _previous_index=engine.catalogue.index)  # the target model's query moments
        metrics = {"encode_seconds": encoded.seconds, "encode_ads_per_second": encoded.ads_per_second}
        return _publish(new, None, experiment, base.run_id, metrics)


def catalogue_carrier(registry: RegistryConfig, cache_dir: Path, progress: bool = False):
    """What promotion runs before `champion` moves (`promote(carry_catalogue=...)`): the
    champion's live catalogue re-encoded by the challenger's model (`reindex`)."""
    return functools.partial(reindex, registry.model_name, cache_dir=cache_dir, experiment=registry.experiment,
                             progress=progress)


class CatalogueWatcher:
    """Keeps `engine` on the current catalogue of one model version: every `interval_s` it reads
    the version's pointer and, when it moved, loads the new version and swaps it in (requests
    in flight finish on the old one; none waits for the load)."""

    def __init__(self, engine, name: str, version: str, *, cache_dir: Path, interval_s: float = 5.0) -> None:
        self.engine, self.name, self.version = engine, name, str(version)
        self.cache_dir, self.interval_s = Path(cache_dir), interval_s
        self.run_id = engine.catalogue.run_id
        self.last_error = ""
        self.reloads = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def check(self) -> bool:
        """Load and swap in a newer version if there is one; True when it did."""
        with self._lock:
            try:
                found = versions.pointer(self.name, self.version)
                run_id = found[0] if found else None
                if run_id == self.run_id:
                    return False
                if run_id is None:  # pointer cleared: back to the model's own ads
                    ref = open_model(f"models:/{self.name}/{self.version}", self.cache_dir)
                    catalogue = current_catalogue(ref, self.cache_dir)
                else:
                    catalogue = versions.load_version(run_id, self.cache_dir)
                catalogue.index  # noqa: B018 - build now, not on the first request
                self.engine.use_catalogue(catalogue)
                self.run_id = run_id
                self.reloads += 1
                self.last_error = ""
                log.info("serving catalogue %s of %s v%s (%d ads)", catalogue.label, self.name, self.version,
                         len(catalogue))
                return True
            except Exception as exc:  # keep serving the version we have; say why on /health
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("catalogue reload of %s v%s failed: %s", self.name, self.version, self.last_error)
                return False

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check()

    def start(self) -> CatalogueWatcher:
        if self._thread is None and self.interval_s > 0:
            self._thread = threading.Thread(target=self._loop, name="catalogue-watcher", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def attach_current(engine: SearchEngine, run_id: str, cache_dir: Path) -> tuple[str, str] | None:
    """Point an engine opened from a logged model at the current catalogue of the registered
    version that run logged. Returns (name, version), or None when the run logged no
    registered version of this store (the engine keeps its own ads)."""
    version = version_of_run(run_id)
    if version is None:
        return None
    ref = ModelRef(version.name, str(version.version), engine.bundle_dir, training_dataset_dir(version), run_id)
    engine.use_catalogue(current_catalogue(ref, cache_dir))
    return version.name, str(version.version)
