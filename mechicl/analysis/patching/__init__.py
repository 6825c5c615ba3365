"""Patching: exact, attribution, label positions, paths, and the result type they share."""
