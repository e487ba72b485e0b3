from __future__ import annotations

import pytest

from backupd.backends.memory import MemoryBackend

from .contract import BackendContract


class TestMemoryContract(BackendContract):
    @pytest.fixture
    def backend(self) -> MemoryBackend:
        return MemoryBackend("mem")
