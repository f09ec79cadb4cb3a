"""Units of work that outlast one call: resumable checkpoints (and, later, executors)."""
