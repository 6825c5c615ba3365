"""Behaviour: Kossen et al.'s curves, the null-hypothesis tests, the ideal Bayesian learner."""
