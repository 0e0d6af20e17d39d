"""Training's CLIs end bad input the flywheel's way: one ``error:`` line, exit 2 (the one UserError class)."""

from __future__ import annotations

from flywheel.errors import UserError, require_artifact, require_file, require_writable, run_command

__all__ = ["UserError", "require_artifact", "require_file", "require_writable", "run_command"]
