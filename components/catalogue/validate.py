"""New ads are checked by the dataset's own Great Expectations rules for ads and images
(`components.data.validate`: the ads-table suite and the images suite), not by a copy.

A folder of new ads is the interchange format's `ads.parquet` + `images/`; it needs no
queries or qrels, so the query, qrels, cross-table and split rules do not apply. The
`split` column is optional here (a catalogue ad is a serving candidate, not part of an
evaluation split): when it is absent every ad is taken as `test`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from components.data.config import ValidateConfig
from components.data.format import ADS_FILE, DatasetFormatError
from components.data.validate import RuleFailure, ValidationResult, validate_ads

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


def validate_new_ads(ads_dir: Path, cfg: ValidateConfig) -> ValidationResult:
    """Run the ads and images rules on the folder; returns the `ValidationResult` (its
    `raise_if_failed()` raises `ValidationError`, whose message names each bad row)."""
    ads = read_new_ads(ads_dir)
    empty = [] if len(ads) else [RuleFailure(table=ADS_FILE, rule="a folder of new ads must hold at least one ad",
                                             column="ad_id", count=0, suite="ads")]
    return validate_ads(Path(ads_dir), ads, cfg, extra_failures=empty)
