"""Heads: ablation, the held-out finder, replication across cells, organisms' ground truth."""
