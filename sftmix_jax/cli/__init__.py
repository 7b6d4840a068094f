"""Command-line tools beside the pipeline: generate (chat), select (data selection)."""
