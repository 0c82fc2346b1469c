"""pyvmm package."""
