"""Datasets: the interchange format, the sources that build it, validation and versioning."""

from components.data.format import (
    Dataset,
    DatasetFormatError,
    dataset_hash,
    read_dataset,
    write_dataset,
)

__all__ = ["Dataset", "DatasetFormatError", "dataset_hash", "read_dataset", "write_dataset"]
