"""The statistics core: bootstraps, sign-flip tests, intervals, Holm, p-value text."""
