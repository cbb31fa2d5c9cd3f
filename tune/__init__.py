"""softfine_tune: the distributed search around softfine (Ray Tune + Optuna + MLflow).

Installed from this folder as the package `softfine_tune` (a name that cannot clash with
`ray.tune`); `python tune/search.py` and `softfine-search` run its driver. One module per concern:
cli (flags), plan (settings checked before Ray starts), space (grid, presets, Optuna searcher),
cluster (Ray connection, resources, placement), trial (the trainable), callback (MLflow child
runs from the driver), tuner (Ray Tune), resume, results, report, plots, tracking (the MLflow
store and parent run), pyfunc (the MLflow model).
"""
