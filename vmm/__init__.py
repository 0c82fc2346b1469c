"""vmm package."""
