"""profile_step's reading of a GPU profile (its CUDA path needs a GPU; the arithmetic does not)."""

from __future__ import annotations

from types import SimpleNamespace

from torch.autograd import DeviceType

from tests.benchmarks.profile_step import kernel_seconds


def test_kernel_time_counts_each_kernel_once():
    """An op's row repeats its kernels' time; the parts' ranges span them: only kernel rows count."""
    rows = [SimpleNamespace(key="aten::bmm", device_type=DeviceType.CPU, self_device_time_total=900.0),
            SimpleNamespace(key="gemv2N_kernel", device_type=DeviceType.CUDA, self_device_time_total=600.0),
            SimpleNamespace(key="elementwise_kernel", device_type=DeviceType.CUDA, self_device_time_total=300.0),
            SimpleNamespace(key="sds", device_type=DeviceType.CUDA, self_device_time_total=5000.0)]
    assert kernel_seconds(rows, {"sds"}) == 900e-6
