"""Reading back: a sweep's trials from MLflow, statistics, plots, the ablation report, the
baseline comparison's tables and a sweep's fault matrix. Starts nothing (no Ray, no sweep):
imports `engine` only to reach the MLflow store, and `core`; nothing here imports `experiments`."""
