"""dpfl: differential-privacy training for JAX."""

__version__ = "0.1.0"
