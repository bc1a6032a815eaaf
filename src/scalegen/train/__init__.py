"""Training: the one trainer, the task base, each model's task and recipe, data caches and auxiliary losses."""
