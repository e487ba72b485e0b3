"""Disaster recovery: choosing an archive and restoring it to a file, an OCI image, a registry."""
