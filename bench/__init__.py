"""backupd's benchmarks: `make bench` (= `python -m bench`). Every figure is a ratio against a
baseline measured in the same run, on the same files and servers. See BENCHMARKS.md."""
