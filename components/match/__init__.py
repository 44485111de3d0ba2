"""Query-ad matching in language space: the MiniLM two-tower matcher and its baselines.

data.py (what a matcher sees), config.py (`MatchConfig`), encoder.py (text tower with a
cached frozen prefix), fusion.py (implicit-fusion image head), losses.py (InfoNCE),
module.py (Lightning training), probe.py (late-fusion term probe), lexical.py (BM25),
systems.py (the six systems behind `train_system` / `Scorer` / `load_scorer`).
"""
