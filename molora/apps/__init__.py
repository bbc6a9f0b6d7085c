"""Entry points: the command line and its commands, the demo, the benchmarks, plots."""
