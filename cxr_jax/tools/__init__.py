"""Command-line tools (`python -m cxr_jax.tools.<name>`)."""
