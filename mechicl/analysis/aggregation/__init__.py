"""Evidence aggregation: direct projections, total effects, fits and steering."""
