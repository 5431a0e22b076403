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


def test_gpu_fails_loudly_when_onnxruntime_falls_back_to_the_cpu(monkeypatch):
    # onnxruntime lists the CUDA provider, then silently runs on the CPU when it cannot
    # load a CUDA library; the service must not serve "gpu" from the CPU.
    import onnxruntime

    from service.devices import _load_cuda_libraries, onnx_session

    class FellBack:
        def __init__(self, path, options, providers):
            self.asked = providers

        def get_providers(self):
            return CPU_ONLY

    preloaded = []
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: WITH_CUDA)
    monkeypatch.setattr(onnxruntime, "InferenceSession", FellBack)
    monkeypatch.setattr(onnxruntime, "preload_dlls", lambda: preloaded.append(1), raising=False)
    _load_cuda_libraries.cache_clear()
    with pytest.raises(DeviceError, match="could not start its CUDA provider"):
        onnx_session("encoder.onnx", "gpu")
    assert onnx_session("encoder.onnx", "auto").asked == WITH_CUDA
    # The pip CUDA libraries were loaded once, before the first CUDA session.
    assert preloaded == [1]
    _load_cuda_libraries.cache_clear()
