import pytest

from service.devices import faiss_gpus, onnx_providers
from service.errors import DeviceError

CPU_ONLY = ["CPUExecutionProvider"]
WITH_CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_auto_takes_cuda_when_onnxruntime_has_it_and_cpu_otherwise():
    assert onnx_providers("auto", WITH_CUDA) == WITH_CUDA
    assert onnx_providers("auto", CPU_ONLY) == CPU_ONLY


def test_cpu_can_be_forced_even_with_cuda_present():
    assert onnx_providers("cpu", WITH_CUDA) == CPU_ONLY
    assert faiss_gpus("cpu", count=2) == 0


def test_gpu_without_a_gpu_fails_loudly():
    with pytest.raises(DeviceError, match="CUDAExecutionProvider"):
        onnx_providers("gpu", CPU_ONLY)
    with pytest.raises(DeviceError, match="faiss sees no GPU"):
        faiss_gpus("gpu", count=0)


def test_faiss_uses_every_gpu_it_sees_on_auto():
    assert faiss_gpus("auto", count=2) == 2
    assert faiss_gpus("auto", count=0) == 0


def test_this_machine_is_detected_without_arguments():
    # Whatever the machine has, auto must pick something that exists.
    import onnxruntime

    assert set(onnx_providers("auto")) <= set(onnxruntime.get_available_providers())


def test_unknown_device_is_refused():
    with pytest.raises(DeviceError, match="one of"):
        onnx_providers("tpu", CPU_ONLY)
