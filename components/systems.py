"""The names of the matching systems and the ablations of `ours`, listed once.

Config (`Literal` fields), the matcher, the benchmark and the CLI all take their names from
here, so an unknown name fails when params are loaded, not after an hour of training.
"""

from __future__ import annotations

from typing import Literal, get_args

SystemName = Literal["lexical", "text_zero_shot", "text_only", "implicit_fusion", "implicit_fusion_words",
                     "late_fusion", "ours"]
SYSTEMS: tuple[str, ...] = get_args(SystemName)
UNTRAINED_SYSTEMS: tuple[str, ...] = ("lexical", "text_zero_shot")
TRAINED_SYSTEMS: tuple[str, ...] = ("text_only", "ours", "implicit_fusion", "implicit_fusion_words")
TWO_TOWER_SYSTEMS: tuple[str, ...] = ("text_zero_shot", *TRAINED_SYSTEMS)
WORD_SYSTEMS: tuple[str, ...] = ("ours", "implicit_fusion_words")  # the ad text carries the aligned words
IMAGE_SYSTEMS: tuple[str, ...] = ("implicit_fusion", "implicit_fusion_words")  # image features fused
# What the registry may serve: a system scoring with one inner product (a faiss index).
RegisteredSystem = Literal["text_only", "implicit_fusion", "implicit_fusion_words", "ours"]

# Ablations of ours, each at the full training data:
# - titles_only: the alignment sees titles (captions) only, no click text (strictly label-free);
# - in_sample: training ads get in-sample words (no cross-fitting);
# - no_channel: words in the text only, no word channel;
# - channel_only: no words in the ad text; the matcher trains on titles and the channel
#   joins after training, calibrated (text_only + the alignment's evidence, one inner product);
# - random_words: words and evidence with no link to the image (a control).
AblationName = Literal["ours_titles_only", "ours_in_sample", "ours_no_channel", "ours_channel_only",
                       "ours_random_words"]
ABLATIONS: tuple[str, ...] = get_args(AblationName)
SplitName = Literal["train", "valid", "test"]
