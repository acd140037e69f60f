"""benchmarks.distill_profile: per-iteration figures from a profile, on a real CPU run and on a
stand-in for a GPU profile (its arithmetic, without double counting kernels)."""
import json
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from benchmarks import common, distill_profile, distill_step
from tests.test_benchmarks import MICRO


def test_operations_are_counted_with_views_apart():
    def function():
        x = torch.ones(6) * 2  # ones, mul
        x.view(2, 3).t().sum()  # view, t (views), sum
    assert distill_profile.count_operations(function) == {"operations": 5, "views": 2}


def test_a_cpu_profile_ranks_operators_by_their_own_time(tmp_path, monkeypatch):
    monkeypatch.setitem(distill_step.CONFIGS, "micro", MICRO)
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    payload = distill_profile.main(["--device", "cpu", "--config", "micro", "--top", "5", "--iterations", "1"])
    own = [row["own_ms"] for row in payload["top"]]
    assert len(own) == 5 and own == sorted(own, reverse=True) and own[0] > 0
    assert 0 < payload["busy_s"] <= payload["wall_s"]  # exclusive times of sequential operators
    assert sum(row["share_of_busy"] for row in payload["top"]) <= 1
    assert any("convolution" in row["operator"] for row in payload["top"])  # convnet_tiny's main cost
    assert payload["dispatched"]["operations"] > payload["dispatched"]["views"] > 0
    assert json.loads((tmp_path / "distill_profile_micro_cpu_keepauto.json").read_text())["top"] == payload["top"]


class FakeProfiler:
    """Two iterations on a GPU: host operators carrying their kernels' time, and the kernels themselves."""

    def key_averages(self):
        def operator(key, device_us, count):
            return SimpleNamespace(key=key, device_type=DeviceType.CPU, self_device_time_total=device_us,
                                   self_cpu_time_total=999.0, count=count)
        kernel = SimpleNamespace(key="void conv_kernel", device_type=DeviceType.CUDA, self_device_time_total=600.0,
                                 self_cpu_time_total=0.0, count=4)
        return [operator("aten::mul", 200.0, 10), operator("aten::convolution", 600.0, 4), kernel]

    def events(self):
        def activity(us):
            return SimpleNamespace(device_type=DeviceType.CUDA, time_range=SimpleNamespace(elapsed_us=lambda: us))
        host = SimpleNamespace(device_type=DeviceType.CPU, time_range=SimpleNamespace(elapsed_us=lambda: 5000))
        return [activity(150.0)] * 4 + [activity(20.0)] * 10 + [host]


def test_a_gpu_profile_counts_each_kernel_once():
    figures = distill_profile.summarise(FakeProfiler(), wall=0.01, iterations=2, device=torch.device("cuda"), top=5)
    assert figures["busy_s"] == pytest.approx((4 * 150 + 10 * 20) / 1e6 / 2)  # kernels only, not their operators too
    assert figures["device_activities"] == 7
    assert [row["operator"] for row in figures["top"]] == ["aten::convolution", "aten::mul"]  # host operators only
    assert figures["top"][0]["own_ms"] == pytest.approx(0.3) and figures["top"][0]["share_of_busy"] == pytest.approx(0.75)
    assert figures["top"][1]["calls"] == 5


def test_flops_are_counted_for_the_forward_and_both_backwards():
    a = torch.randn(6, 5, requires_grad=True)
    b = torch.randn(5, 4)
    assert distill_profile.count_flops(lambda: a @ b) == 2 * 6 * 5 * 4
    # forward, and the backward to a (one more matmul of the same size)
    assert distill_profile.count_flops(lambda: (a @ b).sum().backward()) == 2 * (2 * 6 * 5 * 4)
    assert distill_profile.peak_tflops(torch.device("cpu"), None) is None
    assert distill_profile.peak_tflops(torch.device("cpu"), 1.5) == 1.5
