"""Retrieval: a faiss index over L2-normalised ad embeddings (inner product = cosine)."""

from components.retrieve.index import AdIndex, IndexConfig

__all__ = ["AdIndex", "IndexConfig"]
