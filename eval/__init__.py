"""Evaluation, benchmarks and pictures."""
