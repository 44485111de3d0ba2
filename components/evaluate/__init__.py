"""Evaluation: ranking metrics and AUC (metrics.py), image-only / title-overlap subsets and the
full evaluation of one split (subsets.py), the plots a person reads (plots.py), and the
benchmark that trains and compares every system (benchmark.py, config.py)."""
