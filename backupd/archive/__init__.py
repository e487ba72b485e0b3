"""A checkpoint archive's contents: the one tar reader, CRIU images, metadata, inspect."""
