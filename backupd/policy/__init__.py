"""Policies: CheckpointPolicy documents, their schedules and restic's retention rules. Pure."""
