"""Dataset-wide precompute: streaming selectors and summaries that feed the run directory."""
