"""The modelfs benchmark (run as `python -m bench.run` from the repository root); see bench/README.md."""
