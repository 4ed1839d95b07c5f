"""Scaling-law tooling: sweep grids and runner (grid.py), fits (fit.py), report (report.py), ZeRO memory model (memory.py)."""
