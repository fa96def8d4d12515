"""The method and its training recipe, with no Ray and no MLflow: config, backbone families,
diffusion (schedules, loss, sampler, scoring), tasks and splits, methods (one file each),
accounting, checkpoints and the recipe. Nothing here imports `engine` or `analysis`."""
