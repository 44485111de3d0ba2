"""Search: a self-contained bundle (alignment, matcher, faiss index, catalogue) and the engine
that answers queries from it (`engine.SearchEngine`), plus the HTTP service (`service`)."""
