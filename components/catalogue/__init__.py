"""The live catalogue: the ads a registered model version serves, changed without retraining.

A registered model ships a frozen catalogue (the ads of its training dataset, in its search
bundle). `components.catalogue` lets ads be added, replaced and removed afterwards: new ads
are validated with the dataset rules (`validate`), encoded by the model version's own
alignment network and ad tower (`encode`), and each change becomes a new catalogue version
(`store` on disk, `versions` in MLflow), which search engines load and swap in (`live`).
"""
