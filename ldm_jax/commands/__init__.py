"""absl entry points, one module per ``ldm-jax`` command; each exposes ``run_cli(argv)``."""
