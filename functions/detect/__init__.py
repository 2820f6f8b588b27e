"""Detect stage: label photos."""
