"""Label-free alignment of visual parts to words (docs/method.md#the-alignment-network).

`train_alignment` (train.py) is the stage function; `AlignmentModel` (model.py) is what it
saves and what the matcher uses to translate an image into words.
"""
