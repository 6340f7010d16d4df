"""The device side (never imports torch): data, training loop, checkpoints, runner, manifest, profiler."""
