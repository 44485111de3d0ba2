"""Operations on the live catalogue of a registered model version: open a search engine on
it, add, remove, re-index for a new champion, and keep a running engine on the current version.

    open_engine(uri)         the one way from a model URI to a SearchEngine (bundle + live ads)
    add_ads(uri, dir)        validate -> encode with that version's model -> new version (run)
    remove_ads(uri, ids)     -> new version without them
    reindex(name, a, b)      the live ads of version a encoded by version b (promotion), and
                             the move of `champion` under the same lock
    CatalogueWatcher         polls the version's pointer, loads a new version, swaps it in
    ChallengerCatalogue      keeps a second model's engine on the catalogue the served one has
                             now, encoded by that model (interleaving; cached, never published)

Encoding happens outside the catalogue lock; under it, the change is applied to whatever
version is current (changes are by ad id, so two additions both land), then published with a
compare-and-set on the pointer (`versions.publish`). A promotion holds the same lock while it
re-reads the champion's catalogue, carries it over and moves `champion`, so a change to an
alias (`models:/name@champion`) is checked under the lock against where the alias points now:
when a promotion moved it meanwhile, the ads are encoded again by the new version's model and
land in its catalogue, never in the catalogue of a version no longer served.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from components.catalogue import versions
from components.catalogue.encode import encode_ads
from components.catalogue.images import fill_own_ref, image_name, own_image_ref, resolve_image
from components.catalogue.validate import read_new_ads, validate_new_ads
from components.registry.config import RegistryConfig
from components.registry.models import ModelRef, open_model, parse_model_uri
from components.registry.versions import by_alias, training_dataset_dir, version_of_run
from components.search.bundle import bundle_catalogue
from components.search.catalogue import (
    AD_COLUMNS,
    ANNOTATION_COLUMNS,
    IMAGE_HASH,
    WORD_BOXES,
    Catalogue,
    file_ref_hashes,
    is_saved,
)
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
                         "image_ref": image_refs, IMAGE_HASH: encoded.image_hashes, WORD_BOXES: encoded.word_boxes})


CHANGE_ATTEMPTS = 3  # an alias that moves under a change this often: refused, run it again


def _still_named(model_uri: str, ref: ModelRef) -> bool:
    """True when `model_uri` still names `ref`'s version: always for `models:/name/N`; for an
    alias, read now (under the catalogue lock, where a promotion moves `champion`)."""
    parsed = parse_model_uri(model_uri)
    if parsed is None or parsed[1] is None:
        return True
    current = by_alias(parsed[0], parsed[1])
    return current is not None and str(current.version) == ref.version


def _moved(model_uri: str, ref: ModelRef, attempt: int) -> None:
    log.info("%s moved from v%s while this change was prepared (a promotion); again for the version it names "
             "now", model_uri, ref.version)
    if attempt + 1 == CHANGE_ATTEMPTS:
        raise versions.CatalogueConflict(f"{model_uri} moved {CHANGE_ATTEMPTS} times while this change was prepared; "
                                         "nothing was changed, run it again")


def add_ads(model_uri: str, ads_dir: Path, *, validate_cfg, cache_dir: Path, experiment: str,
            progress: bool = True) -> ChangeResult:
    """Validate, encode and add the ads of `ads_dir` (ads.parquet + images/) to the live
    catalogue of the version behind `model_uri`. Any bad row: `ValidationError` naming it,
    nothing added. An ad id already in the catalogue is replaced."""
    ads_dir = Path(ads_dir)
    validate_new_ads(ads_dir, validate_cfg).raise_if_failed()
    ads = read_new_ads(ads_dir)
    files = [ads_dir / str(p) for p in ads["image_path"]]
    names = [image_name(f) for f in files]
    images = dict(zip(names, files, strict=True))
    for attempt in range(CHANGE_ATTEMPTS):
        ref = open_model(model_uri, cache_dir)
        engine = SearchEngine(ref.bundle_dir, catalogue=current_catalogue(ref, cache_dir))
        encoded = encode_ads(engine, ads, ads_dir, cache_dir=cache_dir, progress=progress,
                             known_word_vectors=engine.catalogue.word_vectors)
        rows = _encoded_rows(encoded, [own_image_ref(n) for n in names])
        with versions.catalogue_lock(ref.name):
            if not _still_named(model_uri, ref):
                _moved(model_uri, ref, attempt)
                continue
            base = current_catalogue(ref, cache_dir)
            new = base.changed(added=rows, added_embeddings=encoded.embeddings,
                               added_word_vectors={**engine.catalogue.word_vectors, **encoded.word_vectors},
                               words_shown=encoded.words_shown)
            metrics = {"encode_seconds": encoded.seconds, "encode_ads_per_second": encoded.ads_per_second}
            published = _publish(new, images, experiment, base.run_id, metrics)
        return ChangeResult(published, published.change["added"], published.change["replaced"], [],
                            encoded.seconds, encoded.ads_per_second, encoded.step_seconds or {})
    raise AssertionError("unreachable: the last attempt returns or raises")


def remove_ads(model_uri: str, ad_ids: list[str], *, cache_dir: Path, experiment: str) -> ChangeResult:
    """Take `ad_ids` out of the live catalogue (an id that is not in it: `KeyError`, nothing removed)."""
    for attempt in range(CHANGE_ATTEMPTS):
        ref = open_model(model_uri, cache_dir)
        with versions.catalogue_lock(ref.name):
            if not _still_named(model_uri, ref):
                _moved(model_uri, ref, attempt)
                continue
            base = current_catalogue(ref, cache_dir)
            new = base.changed(removed=[str(a) for a in ad_ids])
            published = _publish(new, None, experiment, base.run_id, {})
        return ChangeResult(published, removed=published.change["removed"])
    raise AssertionError("unreachable: the last attempt returns or raises")


def _publish(catalogue: Catalogue, images, experiment: str, expected_run_id, metrics) -> Catalogue:
    """`versions.publish`, with this version's own image refs filled in once its run exists."""
    original = catalogue.ads["image_ref"].copy()

    def fill(run_id: str) -> None:
        catalogue.ads["image_ref"] = original.map(lambda ref: fill_own_ref(ref, run_id))

    return versions.publish(catalogue, experiment=experiment, images=images, metrics=metrics,
                            expected_run_id=expected_run_id, before_save=fill)


@dataclass
class _Encoded:
    """Catalogue ads encoded by one model: rows (ad_id, title, words, scores, image_ref,
    image_hash, word_boxes), embeddings in the same order, the query-tower vectors of their words."""

    rows: pd.DataFrame
    embeddings: np.ndarray
    word_vectors: dict[str, np.ndarray]
    seconds: float = 0.0
    words_shown: int | None = None

    @staticmethod
    def empty(engine: SearchEngine) -> _Encoded:
        return _Encoded(pd.DataFrame({c: [] for c in AD_COLUMNS + ANNOTATION_COLUMNS}),
                        np.zeros((0, engine.catalogue.embeddings.shape[1]), np.float32), {})

    @staticmethod
    def keys(ads: pd.DataFrame) -> list[tuple[str, str, str]]:
        """What an ad's encoding depends on: its id, title and image."""
        return list(zip(ads["ad_id"].astype(str), ads["title"].astype(str), ads["image_ref"].astype(str), strict=True))


def _encode_catalogue_ads(engine: SearchEngine, ads: pd.DataFrame, what: str, *, cache_dir: Path,
                          dataset_dir: Path | None, progress: bool) -> _Encoded:
    """`ads` (rows of a catalogue) encoded again by `engine`'s model, their images found by
    their refs. An ad whose image cannot be found raises: a promotion must not serve a
    catalogue another model encoded."""
    if not len(ads):
        return _Encoded.empty(engine)
    files = [resolve_image(str(r), cache_dir, dataset_dir=dataset_dir) for r in ads["image_ref"]]
    lost = [a for a, f in zip(ads["ad_id"], files, strict=True) if f is None]
    if lost:
        raise FileNotFoundError(f"re-indexing {what}: no image for {len(lost)} ads, e.g. {lost[:5]}; not switched")
    frame = pd.DataFrame({"ad_id": ads["ad_id"].to_numpy(), "title": ads["title"].to_numpy(),
                          "image_path": [str(f) for f in files], "split": "test"})
    encoded = encode_ads(engine, frame, Path("/"), cache_dir=cache_dir, progress=progress)
    return _Encoded(_encoded_rows(encoded, ads["image_ref"].astype(str).tolist()), encoded.embeddings,
                    encoded.word_vectors, encoded.seconds, encoded.words_shown)


def _already_carried(target: Catalogue, source: Catalogue) -> bool:
    return any(str(source.run_id) in item for item in target.change.get("reindexed_from", []))


def reindex(name: str, from_version: str | None, to_version: str, *, cache_dir: Path, experiment: str,
            progress: bool = False, then: Callable[[], None] | None = None) -> Catalogue | None:
    """Make the live catalogue of `from_version` (the champion) the catalogue of `to_version`,
    every ad encoded again by `to_version`'s model, then run `then` (promotion's move of
    `champion`) under the same catalogue lock, so no catalogue change lands in between.

    The champion's catalogue as it is now is encoded outside the lock (the long part); under
    it, the catalogue is read again and only the ads that changed meanwhile are encoded.
    Returns the carried catalogue, or None when there is nothing to carry (no champion, or its
    catalogue is still version 0: the new version serves its own ads)."""
    source_ref = open_model(f"models:/{name}/{from_version}", cache_dir) if from_version is not None else None
    target_ref = open_model(f"models:/{name}/{to_version}", cache_dir)
    engine = SearchEngine(target_ref.bundle_dir)
    encoded: _Encoded | None = None
    if source_ref is not None:
        snapshot = current_catalogue(source_ref, cache_dir)
        if snapshot.version > 0 and not _already_carried(current_catalogue(target_ref, cache_dir), snapshot):
            encoded = _encode_catalogue_ads(engine, snapshot.ads, f"catalogue {snapshot.label} of {name} v{from_version}",
                                            cache_dir=cache_dir, dataset_dir=source_ref.dataset_dir, progress=progress)
    with versions.catalogue_lock(name):
        carried = None
        if source_ref is not None:
            carried = _carry(name, str(from_version), source_ref, target_ref, engine, encoded, cache_dir=cache_dir,
                             experiment=experiment, progress=progress)
        if then is not None:
            then()
        return carried


def _carry(name: str, from_version: str, source_ref: ModelRef, target_ref: ModelRef, engine: SearchEngine,
           encoded: _Encoded | None, *, cache_dir: Path, experiment: str, progress: bool) -> Catalogue | None:
    """Under the catalogue lock: the champion's catalogue read now, carried to the target with
    the encodings of `encoded` reused where an ad is unchanged."""
    source = current_catalogue(source_ref, cache_dir)
    if source.version == 0:
        return None
    base = current_catalogue(target_ref, cache_dir)
    if _already_carried(base, source):
        return base  # done by an earlier attempt of this promotion
    ready = encoded if encoded is not None else _Encoded.empty(engine)
    known = set(_Encoded.keys(ready.rows))
    keys = _Encoded.keys(source.ads)
    fresh = _encode_catalogue_ads(engine, source.ads[[k not in known for k in keys]],
                                  f"catalogue {source.label} of {name} v{from_version}", cache_dir=cache_dir,
                                  dataset_dir=source_ref.dataset_dir, progress=progress)
    if len(fresh.rows):
        log.info("%d ads changed in catalogue %s of %s v%s while it was re-encoded; encoded them too",
                 len(fresh.rows), source.label, name, from_version)
    pool_rows = pd.concat([part for part in (ready.rows, fresh.rows) if len(part)] or [ready.rows], ignore_index=True)
    pool_embeddings = np.concatenate([ready.embeddings, fresh.embeddings])
    at = {key: i for i, key in enumerate(_Encoded.keys(pool_rows))}
    order = [at[key] for key in keys]
    rows = pool_rows.iloc[order].reset_index(drop=True)
    embeddings = pool_embeddings[order]
    vectors = {**engine.catalogue.word_vectors, **ready.word_vectors, **fresh.word_vectors}
    in_use = {w for ws in rows["words"] for w in ws}
    new = Catalogue(rows, embeddings, {w: v for w, v in vectors.items() if w in in_use},
                    base.index_cfg, base.version + 1, name, target_ref.version, None, base.run_id,
                    {"added": [], "replaced": [], "removed": [],
                     "reindexed_from": [f"{name} v{from_version} {source.label} ({source.run_id})"]},
                    ready.words_shown or fresh.words_shown, _previous_index=engine.catalogue.index)  # the target model's query moments
    seconds = ready.seconds + fresh.seconds
    metrics = {"encode_seconds": seconds, "encode_ads_per_second": len(rows) / seconds if seconds else 0.0}
    return _publish(new, None, experiment, base.run_id, metrics)


def catalogue_carrier(registry: RegistryConfig, cache_dir: Path, progress: bool = False):
    """What promotion runs to move `champion` (`promote(carry_catalogue=...)`): the champion's
    live catalogue re-encoded by the challenger's model, and the move, under the catalogue
    lock (`reindex(champion, challenger, then=move)`)."""
    return functools.partial(reindex, registry.model_name, cache_dir=cache_dir, experiment=registry.experiment,
                             progress=progress)


# --- a second model on the served catalogue (interleaving) ----------------------------------

INTERLEAVE_CACHE = "interleave"  # under <cache_dir>/catalogue/: one folder per (model, catalogue served)


def _reuse_keys(ads: pd.DataFrame) -> tuple[list[tuple[str, str, str]], list[str]]:
    """What an ad's encoding depends on, as far as two catalogues can tell: its id, title and
    image (the image's sha256, read from its file when a `file:` ref's is not stored, else its
    ref); and the hashes (filled in where they were read)."""
    hashes = file_ref_hashes(ads)
    refs = ads["image_ref"].astype(str)
    keys = [(str(a), str(t), h if h else f"ref:{r}") for a, t, h, r in zip(ads["ad_id"], ads["title"], hashes, refs,
                                                                            strict=True)]
    return keys, hashes


def encoded_copy_dir(cache_dir: Path, ref: ModelRef, source_key: str) -> Path:
    """Where `encode_catalogue_for` keeps the catalogue `source_key` names encoded by `ref`'s model."""
    model = ref.run_id or f"no-run-{ref.name}-{ref.version}"
    return Path(cache_dir) / "catalogue" / INTERLEAVE_CACHE / model / source_key


def encode_catalogue_for(engine: SearchEngine, ref: ModelRef, source: Catalogue, *, source_key: str,
                         cache_dir: Path, source_dataset_dir: Path | None,
                         reuse: Catalogue | None = None) -> Catalogue:
    """`source` (the catalogue another version serves) with every ad encoded by `engine`'s model
    (`ref`'s version): the same ads, ids, titles and images, in the same order, under the same
    version label, with this model's words, regions and embeddings. Not published: it is kept
    in the cache (`encoded_copy_dir`, by this version and `source_key`, a name unique to the
    source version) and read from there the next time.

    An ad whose id, title and image this model has already encoded (its own bundle's ads, and
    those of `reuse`, an earlier copy) keeps that encoding; only the others go through the
    model (`encode_ads`: torch and the vision backbone load then), their images found as
    promotion's re-indexing finds them (`source_dataset_dir`: the source version's dataset)."""
    target = encoded_copy_dir(cache_dir, ref, source_key)
    if is_saved(target):
        return Catalogue.load(target)
    own = bundle_catalogue(ref.bundle_dir, model_name=ref.name, model_version=ref.version, dataset_dir=ref.dataset_dir)
    # `reuse` without a change record is this version's own ads again (the engine as opened).
    pools = [c for c in (own, reuse if reuse is not None and reuse.change else None) if c is not None and len(c)]
    at: dict[tuple[str, str, str], int] = {}
    offset = 0
    for pool in pools:
        at.update({key: offset + i for i, key in enumerate(_reuse_keys(pool.ads)[0])})
        offset += len(pool)
    keys, source_hashes = _reuse_keys(source.ads)
    missing = np.array([key not in at for key in keys], dtype=bool)
    fresh = _encode_catalogue_ads(engine, source.ads[missing],
                                  f"catalogue {source.label} of {source.model_name} v{source.model_version} for "
                                  f"{ref.name} v{ref.version}", cache_dir=cache_dir, dataset_dir=source_dataset_dir,
                                  progress=False)
    at.update({key: offset + i for i, key in enumerate(k for k, m in zip(keys, missing, strict=True) if m)})
    pooled = pd.concat([*(p.ads for p in pools), *([fresh.rows] if len(fresh.rows) else [])], ignore_index=True)
    embeddings = np.concatenate([*(np.asarray(p.embeddings) for p in pools), fresh.embeddings])
    order = [at[key] for key in keys]
    rows = pooled.iloc[order].reset_index(drop=True)
    # Ids, titles and images are the source's; words, scores, regions and vectors this model's.
    for column in ("ad_id", "title", "image_ref"):
        rows[column] = source.ads[column].to_numpy()
    rows[IMAGE_HASH] = [s or h for s, h in zip(source_hashes, rows[IMAGE_HASH], strict=True)]
    vectors = {**{w: v for p in pools for w, v in p.word_vectors.items()}, **fresh.word_vectors}
    in_use = {w for ws in rows["words"] for w in ws}
    copy = Catalogue(rows, embeddings[order], {w: v for w, v in vectors.items() if w in in_use}, own.index_cfg,
                     source.version, ref.name, ref.version, None, source.run_id,
                     {"encoded_from": f"{source.model_name} v{source.model_version} {source.label} ({source_key})",
                      "encoded": int(missing.sum()), "reused": int((~missing).sum())},
                     own.words_shown or fresh.words_shown, _previous_index=own.index)
    if missing.any():
        log.info("catalogue %s of %s v%s for %s v%s: %d ads encoded in %.1f s, %d reused", source.label,
                 source.model_name, source.model_version, ref.name, ref.version, int(missing.sum()), fresh.seconds,
                 int((~missing).sum()))
    copy.save(target)
    return copy


class ChallengerCatalogue:
    """Keeps a second model version's engine (the challenger, interleaved with the served one)
    on the catalogue the served version (`source_ref`) has now: `follow(catalogue)` swaps in
    that catalogue encoded by the challenger's model (`encode_catalogue_for`), so both rank
    the same ads under the same version label. A catalogue it cannot encode leaves the engine
    on the last one and says why (`last_error`): its label then differs from the served one,
    and the service stops interleaving until a later catalogue works."""

    def __init__(self, engine: SearchEngine, ref: ModelRef, source_ref: ModelRef, *, cache_dir: Path) -> None:
        self.engine, self.ref, self.source_ref, self.cache_dir = engine, ref, source_ref, Path(cache_dir)
        self.source_key: str | None = None  # the served catalogue the engine holds a copy of
        self.last_error = ""
        self.follows = 0
        self._lock = threading.Lock()

    def key_of(self, catalogue: Catalogue) -> str:
        """A name unique to a catalogue version of the served model: its run, or for version 0
        (the served version's own ads) that version's run."""
        return catalogue.run_id or f"v0-{self.source_ref.run_id or f'{self.source_ref.name}-{self.source_ref.version}'}"

    def follow(self, catalogue: Catalogue) -> bool:
        """Rank `catalogue` (the one the served engine just swapped in) from now on; True when the
        engine holds its copy (already, or now)."""
        key = self.key_of(catalogue)
        with self._lock:
            if key == self.source_key:
                return True
            try:
                copy = encode_catalogue_for(self.engine, self.ref, catalogue, source_key=key, cache_dir=self.cache_dir,
                                            source_dataset_dir=self.source_ref.dataset_dir, reuse=self.engine.catalogue)
                copy.index  # noqa: B018 - build now, not on the first request
                self.engine.use_catalogue(copy)
            except Exception as exc:  # the served model goes on; interleaving waits for a catalogue that works
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("%s v%s cannot rank catalogue %s of %s v%s: %s", self.ref.name, self.ref.version,
                            catalogue.label, self.source_ref.name, self.source_ref.version, self.last_error)
                return False
            self.source_key, self.last_error = key, ""
            self.follows += 1
            log.info("%s v%s ranks catalogue %s of %s v%s (%d ads)", self.ref.name, self.ref.version, catalogue.label,
                     self.source_ref.name, self.source_ref.version, len(copy))
            return True


class CatalogueWatcher:
    """Keeps `engine` on the current catalogue of one model version: every `interval_s` it reads
    the version's pointer and, when it moved, loads the new version and swaps it in (requests
    in flight finish on the old one; none waits for the load). `on_swap(catalogue)` runs after
    each swap, in the watcher's thread (a `ChallengerCatalogue.follow`)."""

    def __init__(self, engine, name: str, version: str, *, cache_dir: Path, interval_s: float = 5.0,
                 on_swap: Callable[[Catalogue], object] | None = None) -> None:
        self.engine, self.name, self.version = engine, name, str(version)
        self.cache_dir, self.interval_s = Path(cache_dir), interval_s
        self.on_swap = on_swap
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
            except Exception as exc:  # keep serving the version we have; say why on /health
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("catalogue reload of %s v%s failed: %s", self.name, self.version, self.last_error)
                return False
            if self.on_swap is not None:  # it says on its own what went wrong
                self.on_swap(catalogue)
            return True

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
