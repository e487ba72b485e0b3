"""The retention report: built from the catalog, rendered as a table, JSON or HTML."""
