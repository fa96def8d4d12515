"""Multi-task composition: task modules trained apart, then composed (stages.py runs the sweeps,
evaluate.py scores the compositions, report.py writes the tables and heatmaps)."""
