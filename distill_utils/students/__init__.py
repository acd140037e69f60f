"""Evaluation: students trained on a set (distilled, coreset, random or full data), retrieval benchmarks
and metrics, coreset selection, the full-data row."""
