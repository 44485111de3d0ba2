"""Retrieval: a faiss index over L2-normalised ad embeddings (inner product = cosine).

`index.AdIndex` builds, searches, saves and loads it; `config.IndexConfig` says how.
"""
