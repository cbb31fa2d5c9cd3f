#!/usr/bin/env python
"""Distributed hyperparameter search for SoftFiNE: Ray Tune + Optuna over the paper's grid, one
GPU per trial, every trial an MLflow child run under one parent run per search.

    python tune/search.py --dataset weibo
    python tune/search.py --help

The work is done by the modules beside this script (softfine_tune_*.py), imported from this
directory, which Python puts first on sys.path when it runs a script. Their names are unique, so
they shadow nothing (and `import ray.tune` is never shadowed by this `tune/` folder).
"""

import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # run as `python tune/search.py`, sys.path[0] is already this directory
    sys.path.insert(0, HERE)

from softfine_tune_search import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
