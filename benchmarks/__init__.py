"""GPU benchmarks of graphopt against eager and inductor: `python -m benchmarks.run`, `python -m benchmarks.report`."""
