"""Retrieval: a faiss index over the ad tower's vectors, ranked by inner product (the model's score).

`index.AdIndex` builds, searches, saves and loads it; `config.IndexConfig` says how.
"""
