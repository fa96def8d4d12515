"""Ablation grids: `lora-diffusion grid`, a grid file from search_spaces/ through the sweep engine.

    python jobs/ablation_grid.py                                   # grid_rank_schedule.yaml, SST-2
    python jobs/ablation_grid.py --grid grid_module_count          # any grid_*.yaml (or a path)
    python jobs/ablation_grid.py --smoke                           # tiny backbone, 2 values per axis x 2 seeds
    python jobs/ablation_grid.py --grid NAME --resume              # continue an interrupted grid
    lora-diffusion report --sweep NAME                             # rebuild the report from MLflow

Every cell x seed is one Tune trial (grid search, run to the end: no early stopping). The table
(mean, std, 95% CI, paired difference to the reference cell), parquet files, heatmaps and the
Pareto plot are written on the sweep's MLflow parent run when the grid ends.

A thin wrapper of `lora-diffusion grid` that imports only the installed package, so
`ray submit cluster.yaml jobs/ablation_grid.py` can copy this file alone.
"""

import sys

from lora_diffusion.cli import main

if __name__ == "__main__":
    sys.exit(main(['grid', *sys.argv[1:]]))
