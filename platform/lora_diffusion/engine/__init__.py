"""The only layer that talks to Ray Tune / Train, Optuna and MLflow: sweep specs, search spaces
and grids, the tuner and its resume, the trial, callbacks, tracking, storage, cluster helpers.
Imports `core`, never `analysis`."""
