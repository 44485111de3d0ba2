"""Traffic: the log of searches and clicks (`events`, written off the request path by
`writer`), the rules a click must pass (`clicks`), the position-based click model fitted to the
log (`clickmodel`) and simulated users that produce traffic over HTTP (`simulator`)."""
