"""The experiments that launch sweeps on the engine and read their trials back through
`analysis`: the baseline comparison (comparison.py, with its tuning candidates and budget
matching), the retrain stage after a sweep, the soak (a sweep killed and resumed), multi-task
composition (composition/) and the benchmark (bench/). Imports `analysis`, `engine` and `core`;
nothing imports it but cli.py."""
