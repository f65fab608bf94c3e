"""The application behind the `bspf-ext` command: run configuration (config.py), datasets
that need no download (data.py), checkpoints (checkpoints.py, atomic.py), training
(train.py), evaluation and FLOPs accounting (evaluate.py), the demo (demo.py), figures
(viz.py), operator benchmarks (bench.py) and the command line (cli.py). It builds on the
library (bspf_ext.nn, models, pruning); nothing in the library imports it."""
