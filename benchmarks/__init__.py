"""Benchmarks: Spec-Bench harness, load generator, kernel benchmarks."""
