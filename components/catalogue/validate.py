"""New ads are checked by the dataset's own Great Expectations rules for ads and images
(`components.data.validate`: the ads-table suite and the images suite), not by a copy.

A folder of new ads is the interchange format's `ads.parquet` + `images/`; it needs no
queries or qrels, so the query, qrels, cross-table and split rules do not apply. The
`split` column is optional here (a catalogue ad is a serving candidate, not part of an
evaluation split): when it is absent every ad is taken as `test`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pandas as pd

from components.data.format import ADS_FILE, DatasetFormatError

DEFAULT_SPLIT = "test"


def read_new_ads(ads_dir: Path) -> pd.DataFrame:
    """The raw `ads.parquet` of a folder of new ads (a missing or unreadable file raises
    `DatasetFormatError` naming it)."""
    ads_dir = Path(ads_dir)
    if not ads_dir.is_dir():
        raise DatasetFormatError(f"{ads_dir}: not a directory (a folder of new ads holds {ADS_FILE} and images/)")
    path = ads_dir / ADS_FILE
    if not path.is_file():
        raise DatasetFormatError(f"{path}: file not found (a folder of new ads holds {ADS_FILE} and images/)")
    try:
        ads = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise DatasetFormatError(f"{path}: not a readable parquet file ({exc})") from exc
    if "split" not in ads.columns:
        ads = ads.assign(split=DEFAULT_SPLIT)
    return ads


def validate_new_ads(ads_dir: Path, cfg):
    """Run the ads and images suites on the folder; returns the `ValidationResult` (its
    `raise_if_failed()` raises `ValidationError`, whose message names each bad row)."""
    from components.data import validate as rules

    started = time.perf_counter()
    ads_dir = Path(ads_dir)
    ads = read_new_ads(ads_dir)
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    context = rules._new_context(gx, None)
    suites = [rules._ads_suite(gx, ads)]
    images_suite, image_stats = rules._images_suite(gx, ads_dir, ads, cfg.min_image_side)
    if images_suite is not None:
        suites.append(images_suite)
    source = context.data_sources.add_pandas("alignsearch_new_ads")
    failures = []
    for suite in suites:
        if suite.rules:
            failures += rules._run_suite(gx, context, source, suite, cfg.max_examples)
    empty = {"rows": 0, "columns": []}
    stats = {"ads": rules._table_stats(ads), "queries": empty, "qrels": empty, "images": image_stats}
    if len(ads) == 0:
        failures.append(rules.RuleFailure(table=ADS_FILE, rule="a folder of new ads must hold at least one ad",
                                          column="ad_id", count=0, suite="ads"))
    return rules.ValidationResult(root=ads_dir, success=not failures, failures=failures, stats=stats,
                                  seconds=round(time.perf_counter() - started, 3),
                                  num_rules=sum(len(s.rules) for s in suites))
