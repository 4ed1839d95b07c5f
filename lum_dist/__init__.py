"""lum-dist: pretraining, querying and downstream use of Large User Models (arXiv 2502.08309)."""

__version__ = "0.1.0"
