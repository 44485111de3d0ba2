"""Vision: the frozen EfficientNet-Lite0 backbone (backbone.py), visual parts of images
(parts.py, `extract_parts`), their content-addressed cache (cache.py) and the extractor's
configuration (config.py, importable without torch)."""
