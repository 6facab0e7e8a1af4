"""Training: data sources, model zoo, loop, metrics, plots (needs the [train] extra)."""
