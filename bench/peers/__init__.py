"""Servers a user would pick instead of ours, each written the way its own documentation shows.

Every peer serves the same ``models/trashnet/model.onnx`` (or its weights, for torch) through the same
image function (``service.imaging``), so ``bench.serve`` can check that their answers agree with ours
before it compares speed. ``bench.serve.PEERS`` says how each one is started.
"""
