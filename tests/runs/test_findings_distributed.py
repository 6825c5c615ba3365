"""The findings grid on existing engines: the local worker pool (2 processes, a fresh one per cell), a Dask
LocalCluster (2 workers x 1 thread) and submitit's local executor give the same cells as a serial run."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from mechicl.runs import findings as F
from tests.runs.test_findings import QUIET, SPEC


def _tables(out):
    return {
        (slug, t): pd.read_csv(out / "cells" / slug / f"{t}.csv")
        for slug in sorted(F.finished(out))
        for t in ("screen", "confirm", "validate", "sets")
    }


@pytest.fixture(scope="module")
def serial_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("serial")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers run
    try:
        F.run_grid(SPEC, out, **QUIET)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def serial(serial_out):
    return _tables(serial_out)


def _same(a, b):
    assert a.keys() == b.keys() and len(a) == 8
    for key in a:
        pd.testing.assert_frame_equal(a[key], b[key], check_exact=False, rtol=1e-9, atol=1e-12)


def test_dask_local_cluster_equals_serial(serial, tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        ex, n = F.make_executor(scheduler=cluster.scheduler_address)
        assert n == 2
        F.run_grid(SPEC, tmp_path, executor=ex, **QUIET)
    _same(serial, _tables(tmp_path))


def test_submitit_local_executor_equals_serial(serial, tmp_path):
    submitit = pytest.importorskip("submitit")
    ex = submitit.LocalExecutor(folder=str(tmp_path / "logs"))
    ex.update_parameters(timeout_min=10)
    F.run_grid(SPEC, tmp_path / "grid", executor=ex, **QUIET)
    _same(serial, _tables(tmp_path / "grid"))


def test_engine_options_are_checked():
    with pytest.raises(F.ConfigError, match="either"):
        F.make_executor(scheduler="tcp://x:1", slurm={"timeout_min": 1})
    assert F.make_executor(workers=1) == (None, 1)


def test_local_worker_pool_runs_each_cell_in_a_fresh_process_and_equals_serial(serial_out, tmp_path):
    ex, n = F.make_executor(workers=2)
    assert n == 2 and ex._max_tasks_per_child == 1  # a fresh process per cell: no cell inherits another's heap
    with ex:
        F.run_grid(SPEC, tmp_path, executor=ex, **QUIET)
    assert F.finished(tmp_path) == F.finished(serial_out)
    for slug in F.finished(tmp_path):  # byte-identical CSVs, not only close: the same code on one thread
        for t in ("screen", "confirm", "validate", "sets", "controls"):
            name = f"cells/{slug}/{t}.csv"
            assert (tmp_path / name).read_bytes() == (serial_out / name).read_bytes(), name
