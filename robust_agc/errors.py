"""Exceptions that mark *user* errors: the CLI prints their message on one line and exits 2."""

from __future__ import annotations

__all__ = ["UserError", "CheckpointError", "DataUnavailableError"]


class UserError(ValueError):
    """Bad input from the user (a value out of range, an unknown name, a missing file)."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, unsafe to load, or for another architecture."""


class DataUnavailableError(UserError):
    """A dataset that cannot be found locally and may not be downloaded."""
