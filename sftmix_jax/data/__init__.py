"""Data: sources and templates (sources.py), batches (batching.py), the synthetic suite (synthetic.py)."""
