"""BSR-Net now lives in :mod:`robust_agc.sparse.schedulers.bsr`; this module re-exports its
public names for old imports."""

from .schedulers.bsr import NOISE_FORMS, SIGN_BUFFER, BSRScheduler, build_bsr, create_bsr

__all__ = ["NOISE_FORMS", "SIGN_BUFFER", "BSRScheduler", "build_bsr", "create_bsr"]
