"""Offline training of DeepMAD models (torch): data sources, networks, methods, export to ONNX."""
