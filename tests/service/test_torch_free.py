import subprocess
import sys

SERVICE_MODULES = [
    "service.bundle",
    "service.retrieval",
    "service.encoder",
    "service.histories",
    "service.devices",
]


def test_the_service_never_imports_torch():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in SERVICE_MODULES)
        + "leaked = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\n"
        + "assert not leaked, leaked\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
