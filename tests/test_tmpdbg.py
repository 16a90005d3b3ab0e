import multiprocessing
import mp_helpers as mp
import pytest
from hypercacheio import Cache
FORK = multiprocessing.get_context("fork")

@pytest.mark.parametrize("l1", [1, 0])
def test_x(cache_dir, l1):
    Cache(cache_dir).set_many({"a": 0, "b": [0]})
    w, r = FORK.Pipe()
    writer = mp.start(FORK, mp.lockstep_writer, cache_dir, w, 300)
    assert mp.run_all(FORK, mp.lockstep_reader, [(cache_dir, r)]) == [300]
