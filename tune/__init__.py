"""softfine_tune: the distributed search around softfine (Ray Tune + Optuna + MLflow).

Installed from this folder as the package `softfine_tune` (a name that cannot clash with
`ray.tune`); `python tune/search.py` and `softfine-search` run its driver. One module per concern,
in the order a search meets them: cli (flags), plan (settings checked before Ray starts), space
(grid, presets, Optuna searcher), tracking (the MLflow store), storage and lock (the search's files,
one driver per search), record and resume, cluster (Ray connection, resources, placement), trial
(the trainable), callback, child_runs and account (the MLflow child runs, from the driver), tuner and
in_place (Ray Tune, restored in place), console, results, report, plots, runs (the parent run), model
and pyfunc (the MLflow model).
"""
