"""Experiments built on the training application (never imported by the library)."""
