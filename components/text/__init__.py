"""Text side: the MiniLM sentence encoder (offline weights) and the content-word vocabulary."""
