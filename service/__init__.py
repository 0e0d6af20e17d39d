"""Recycling-bin classifier service: image bytes in, DeepMAD verdict out (no torch here)."""
