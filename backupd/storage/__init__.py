"""Archives in a backend: keys and manifests, the pack/unpack streams, the commit, prune,
delete, verify and rebuild protocols, and reading an archive back."""
