"""Reference implementations of the patterns mtlfast replaces, for side-by-side benchmarks."""
