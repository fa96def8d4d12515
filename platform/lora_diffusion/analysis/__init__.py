"""Reading trials back from MLflow, statistics, plots, reports, budget matching, the baseline
comparison and benchmarks. Calls `engine` and `core`; nothing imports it but the CLI and jobs."""
