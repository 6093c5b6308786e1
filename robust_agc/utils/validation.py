"""Number checks with one clear error (defined in :mod:`attacks.validation`, the lowest layer)."""

from attacks.validation import check_int, check_real

__all__ = ["check_int", "check_real"]
