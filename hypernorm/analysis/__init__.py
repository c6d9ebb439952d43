"""Analysis: experiment grids, result tables and figures."""
