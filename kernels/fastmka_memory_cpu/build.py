"""Building the C++ extension of the fused CPU memory pass (``extension.cpp`` with ``forward.h``, ``backward.h``).

It is compiled on first use (``torch.utils.cpp_extension.load``, about a minute, cached per machine under
``TORCH_EXTENSIONS_DIR``). Without a C++ compiler, or with ``MKA_CPU_FUSED=0``, there is none: the ops of
this family then run their reference (the composed ``mka::`` ops) on the CPU too, and the engine does not pick
them (:func:`built` is False).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sysconfig
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).parent
SOURCE = HERE / "extension.cpp"  # one translation unit; it includes the headers beside it
ENV = "MKA_CPU_FUSED"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


@functools.cache
def extension():
    """The compiled module, or None (turned off, or it does not build here; a warning says why, once)."""
    if os.environ.get(ENV, "1") == "0":
        return None
    flags = ["-O3", "-fopenmp"]  # OpenMP: ATen's parallel_for and vectorised dot products
    cpu = _cpu_flags()
    if cpu:  # tuned for this CPU; the name keeps builds for different CPUs apart in a shared cache
        flags.append("-march=native")
    # the name changes with the sources (headers included: torch's build check reads only the .cpp) and the CPU
    digest = hashlib.sha1(cpu.encode())
    for f in sorted(HERE.glob("*.[ch]*")):
        if f.suffix in (".cpp", ".h"):
            digest.update(f.read_bytes())
    tag = digest.hexdigest()[:12]
    _ninja_on_path()
    try:
        from torch.utils import cpp_extension

        return cpp_extension.load(
            name=f"mka_fastmka_memory_cpu_{tag}", sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"]
        )
    except Exception as e:  # no compiler, no headers: the reference ops still work
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(
            f"mka_compile: the fused CPU memory path did not build ({first}); converted FastMKA sites run the "
            f"reference ops (same results, slower). Set {ENV}=0 to skip the build.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


@torch.compiler.assume_constant_result
def built() -> bool:
    """Whether the extension is there (built on the first call): a constant of the process, also to torch.compile."""
    return extension() is not None


def _ninja_on_path() -> None:
    """The build runs ``ninja`` from PATH; the ``ninja`` package installs it next to this interpreter, which is not
    on PATH when a virtual environment's python runs without being activated (``.venv/bin/python -m pytest``)."""
    if shutil.which("ninja") is None:
        scripts = sysconfig.get_path("scripts")
        if scripts and (Path(scripts) / "ninja").exists():
            os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
