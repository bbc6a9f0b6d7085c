"""Training: multitask data, YAML run configs, the accelerate loop, checkpoints, evaluation."""
