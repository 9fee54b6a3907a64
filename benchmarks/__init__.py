"""Side-by-side measurements, run as modules (`python -m benchmarks.attention`); results go to
BENCHMARKS.md, one marked section per benchmark."""
