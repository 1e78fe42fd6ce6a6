"""cmt: consistency mid-training for consistency, mean-flow and flow-map models."""
__version__ = "0.1.0"
