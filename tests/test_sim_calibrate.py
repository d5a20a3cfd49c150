"""Calibration: every microbenchmark yields a sane figure, and the `here` profiles use exactly what was measured."""
from __future__ import annotations

import pytest

from sim.calibrate import calibrate, load_calibration, save_calibration
from sim.profiles import device_profile, link_profile


@pytest.fixture(scope="module")
def cal():
    return calibrate(quick=True)


def test_microbenchmarks_give_sane_figures(cal):
    assert 1e9 < cal.matmul_flops < 1e14
    assert 1e8 < cal.block_flops < 1.5 * cal.matmul_flops  # a whole block cannot beat its own GEMMs by much
    assert cal.memory_bandwidth > 1e8 and cal.codec_bytes_per_s > 1e6
    assert 1e-6 < cal.grpc_rtt_s < 0.1
    assert cal.threads >= 1 and cal.model == "smollm2-135m"


def test_here_profiles_use_the_saved_measurements(cal, tmp_path, monkeypatch):
    path = tmp_path / "cal.json"
    monkeypatch.setenv("TANDEM_SIM_CALIBRATION", str(path))
    with pytest.raises(FileNotFoundError, match="tandem sim calibrate"):
        device_profile("here")
    save_calibration(cal, path)
    assert load_calibration() == cal
    here = device_profile("here")
    assert here.flops == cal.block_flops and here.codec == cal.codec_bytes_per_s
    assert device_profile("here-matmul").flops == cal.matmul_flops
    link = link_profile("testbed-20mbit")
    assert link.up_bps == link.down_bps == 20e6 and link.rtt == cal.grpc_rtt_s
