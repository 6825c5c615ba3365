"""The prior against the context: per-query prior strength and moderation, the route decomposition at the
readout slot, and the dose-response of head outputs (issue 28)."""
