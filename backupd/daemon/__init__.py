"""The daemon: the scheduler and its cycles, the HTTP API, webhook alerts."""
