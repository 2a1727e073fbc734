"""PyTorch reference plugin (placeholder; commands added below)."""
