"""Spec files: the typed schema, the registry of families, detection, and the spec-bound Checkpoint."""
