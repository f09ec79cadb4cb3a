"""Work that outlasts one call or one machine: resumable checkpoints (several writers), executors
(local, Ray actors holding model replicas), the units and exact merges of each analysis, device maps."""
