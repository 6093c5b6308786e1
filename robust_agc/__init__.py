"""robust_agc: adversarially robust sparse training with adaptive gradient correction (AGC)."""

__version__ = "0.1.0"
