"""Helpers the benchmark scripts share (a package, so the scripts' glob does not run it as a benchmark)."""
