"""data_workers="auto": grain worker processes where the GIL stops threads from scaling."""

import os

import pytest

from eca_flax.data import pipeline
from eca_flax.training import config as cfg


def test_auto_follows_the_measured_gil_share():
    # Amdahl for the measured GIL share (0.30): 2 threads make 1.54x, within the 1.25x margin of
    # 2 workers' 1.72x (0.86 x 2); 16 threads 2.91x against 16 workers' 13.8x.
    assert pipeline.auto_workers(1) == (0, 1)
    assert pipeline.auto_workers(2) == (0, 2)
    assert pipeline.auto_workers(16) == (16, 1)
    assert pipeline.auto_workers(64) == (64, 1)
    # Without a GIL-held part threads always suffice; with all of it held, workers from 2 cores.
    assert pipeline.auto_workers(16, gil_share=0.0) == (0, 16)
    assert pipeline.auto_workers(2, gil_share=1.0) == (2, 1)


def test_default_is_auto_resolved_for_this_machine():
    c = cfg.default_config()
    assert c.data_workers == "auto"
    resolved = cfg.resolve_config(c)
    assert resolved.data_workers == pipeline.auto_workers(len(os.sched_getaffinity(0)))[0]


@pytest.mark.parametrize(("value", "expected"), [(3, 3), ("4", 4), (0, 0)])
def test_counts_are_kept(value, expected):
    c = cfg.default_config()
    c.data_workers = value  # a config file's int, or a flag's string
    assert cfg.resolve_config(c).data_workers == expected


@pytest.mark.parametrize("value", [-1, "many", 1.5, True])
def test_bad_counts_are_refused(value):
    c = cfg.default_config()
    c.data_workers = value
    with pytest.raises(cfg.ConfigError, match="data_workers"):
        cfg.resolve_config(c)
