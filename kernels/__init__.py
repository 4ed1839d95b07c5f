"""Triton kernels of lum-dist. Installed as ``lum_dist.kernels`` (see pyproject's package-dir):
never import this folder as a top-level ``kernels`` package."""
