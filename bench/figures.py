"""Where the benches' plots are saved: atomically, so a docs PNG is never left half written."""

from __future__ import annotations

import io
from pathlib import Path

from service.fileio import write_atomic


def save_png(figure, path: Path, dpi: int | None = None) -> None:
    """Render a matplotlib figure to PNG and put it at ``path`` in one rename."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    write_atomic(path, buffer.getvalue())
