"""Yardsticks the tests and benches measure Tandem against; not part of the runtime."""
