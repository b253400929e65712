"""Training: device and precision, optimizers, schedules, checkpoints, faults, the loop."""
