"""fl: a federated learning runtime for PyTorch."""

__version__ = "0.1.0"
