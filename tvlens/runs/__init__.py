"""Units of work that outlast one call: resumable checkpoints, executors (local, Ray), device maps."""
