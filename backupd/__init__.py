"""backupd: scheduled Kubernetes container checkpoints, shipped, catalogued, pruned, restored."""

__version__ = "0.1.0"
