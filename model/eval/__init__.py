"""Evaluation: metrics, the evaluation run (JSON + CSV + Markdown + PNG crops), benchmarks."""
