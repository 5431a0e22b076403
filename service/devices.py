"""Where inference runs: onnxruntime execution providers and faiss GPU use.

``auto`` takes the GPU when the installed build supports it and a device is present, and
the CPU otherwise; ``cpu`` forces the CPU; ``gpu`` requires the GPU and fails loudly
without one (a silent CPU fallback would hide a broken deployment).
"""

from __future__ import annotations

import functools
import logging

from service.errors import DeviceError

LOG = logging.getLogger(__name__)

CHOICES = ("auto", "cpu", "gpu")


def _check(choice: str) -> None:
    if choice not in CHOICES:
        raise DeviceError(f"device must be one of {', '.join(CHOICES)}, not {choice!r}")


def onnx_providers(choice: str = "auto", available: list[str] | None = None) -> list[str]:
    """Execution providers for onnxruntime, best first."""
    _check(choice)
    if available is None:
        import onnxruntime

        available = onnxruntime.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if choice == "gpu" and not has_cuda:
        raise DeviceError(
            "device 'gpu' asked for, but onnxruntime has no CUDAExecutionProvider "
            f"(available: {', '.join(available)}); install the gpu extra"
        )
    if has_cuda and choice != "cpu":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def faiss_gpus(choice: str = "auto", count: int | None = None) -> int:
    """How many GPUs faiss should use (0: search on the CPU)."""
    _check(choice)
    if count is None:
        import faiss

        count = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if choice == "gpu" and count == 0:
        raise DeviceError("device 'gpu' asked for, but faiss sees no GPU (install faiss-gpu)")
    return 0 if choice == "cpu" else count


def onnx_session(path, device: str = "auto", threads: int = 1):
    """An onnxruntime session with the service's thread and provider settings."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # One intra-op thread was fastest for single requests here; batching gives throughput,
    # and concurrent requests get parallelism from the server's threads.
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = onnx_providers(device)
    if "CUDAExecutionProvider" in providers:
        _load_cuda_libraries(ort)
    session = ort.InferenceSession(str(path), options, providers=providers)
    if device == "gpu" and "CUDAExecutionProvider" not in session.get_providers():
        # onnxruntime falls back to the CPU when the CUDA provider fails to load (a missing
        # CUDA or cuDNN library), logging an error and nothing more.
        raise DeviceError(
            f"{path}: device 'gpu' asked for, but onnxruntime could not start its CUDA "
            "provider (see its log above for the missing library)"
        )
    return session


@functools.cache
def _load_cuda_libraries(ort) -> None:
    # The gpu extra's CUDA and cuDNN wheels lie off the dynamic loader's path, which is
    # fixed at process start; onnxruntime loads them by path when asked, once per process.
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        preload()


def limit_native_threads(threads: int) -> None:
    """Threads of the native kernels the pipeline calls: faiss's OpenMP loops (for the
    calling thread, as OpenMP keeps the setting per thread) and the BLAS libraries of numpy
    and faiss (for the process). Both default to one thread per core and spin between
    calls, which on a small machine takes cores from the event loop; batching, not
    intra-op threads, gives the service its throughput. onnxruntime has its own setting.
    """
    import faiss  # noqa: F401  (its OpenMP and BLAS must be loaded to be limited)
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads)
