"""Capture: the photos the service keeps for operators to label (docs/capture-format.md).

``format`` the on-disk contract (also importable as ``service.capture_format``, its published name),
``store`` the folder with its byte budget and index, ``writer`` the capture policy and the background
writer thread, ``io`` the helper process that makes a batch durable. Nothing is imported here, so the
exporter and the helper process load only the module they name.
"""
