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
    assert [t for t, _ in cal.block_curve] == [64, 128, 256, 512]  # batch 4 x 16..128 tokens
    assert dict(cal.block_curve)[256] == cal.block_flops


def test_throughput_follows_the_measured_curve():
    from sim.profiles import DeviceProfile
    d = DeviceProfile("d", 5.0, 1, 1, 4, 1, "test", flops_curve=((100, 10.0), (400, 30.0)))
    assert d.throughput(None) == 5.0
    assert d.throughput(50) == 10.0 and d.throughput(1000) == 30.0  # the nearest measured size outside
    assert d.throughput(200) == pytest.approx(20.0)  # halfway in log(tokens)
    assert DeviceProfile("g", 7.0, 1, 1, 2, 1, "datasheet").throughput(123) == 7.0


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
