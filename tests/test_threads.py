"""One thread setting for torch and FAISS: $OMP_NUM_THREADS when set, else half the available CPUs."""

from __future__ import annotations

import faiss
import pytest
import torch

from protolib.utils import threads as threads_module
from protolib.utils.threads import configure_threads, default_threads


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
    faiss.omp_set_num_threads(before)


def test_omp_num_threads_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    assert configure_threads() == 3
    assert torch.get_num_threads() == 3 and faiss.omp_get_max_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    with pytest.raises(ValueError, match="OMP_NUM_THREADS='many'"):
        default_threads()


def test_default_is_half_the_available_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for cpus, expected in ((2, 1), (1, 1), (16, 8)):
        monkeypatch.setattr(threads_module, "available_cpus", lambda cpus=cpus: cpus)
        assert default_threads() == expected
    assert configure_threads(2) == 2 and torch.get_num_threads() == 2 and faiss.omp_get_max_threads() == 2
    with pytest.raises(ValueError, match="at least 1"):
        configure_threads(0)
