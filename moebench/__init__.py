"""moebench: benchmarking post-training expert pruning of Mixture-of-Experts language models."""

__version__ = "0.1.0"
