"""What the methods cost (`lora-diffusion bench`): benchmark.py runs the sections; train.py,
infer.py, sweep.py and scaling.py measure them on a workbench.py model with timing.py's clocks;
report.py turns the JSON into the performance table and plots."""
