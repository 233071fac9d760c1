"""Cluster operations: remote submission of specs as Ray Jobs, the CLT registry, nightly retraining."""
