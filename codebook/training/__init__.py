"""The training loop, its configuration and engines (no Ray needed)."""
