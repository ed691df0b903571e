"""Building a kernel family's C++ CPU kernels on first use (``torch.utils.cpp_extension.load``, about a minute,
cached per machine under ``TORCH_EXTENSIONS_DIR``).

A family keeps one translation unit ``extension.cpp`` (with the headers beside it) in its folder and calls
:func:`load`. Without a C++ compiler, or with ``MKA_CPU_FUSED=0``, there is no extension: the family's ops run their
reference on the CPU (same results, slower), and a warning says why once.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sysconfig
import warnings
from pathlib import Path

ENV = "MKA_CPU_FUSED"  # "0": build no C++ kernel, run the references


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


@functools.cache
def _load(name: str, folder: str, what: str):
    flags = ["-O3", "-fopenmp"]  # OpenMP: ATen's parallel_for and vectorised loops
    cpu = _cpu_flags()
    if cpu:  # tuned for this CPU; the name keeps builds for different CPUs apart in a shared cache
        flags.append("-march=native")
    # the name changes with the sources (headers included: torch's build check reads only the .cpp) and the CPU
    digest = hashlib.sha1(cpu.encode())
    for f in sorted(Path(folder).glob("*.[ch]*")):
        if f.suffix in (".cpp", ".h"):
            digest.update(f.read_bytes())
    tag = digest.hexdigest()[:12]
    _ninja_on_path()
    try:
        from torch.utils import cpp_extension

        return cpp_extension.load(
            name=f"{name}_{tag}",
            sources=[str(Path(folder) / "extension.cpp")],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
        )
    except Exception as e:  # no compiler, no headers: the reference ops still work
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(
            f"mka_compile: {what} did not build ({first}); the reference ops run instead (same results, slower). "
            f"Set {ENV}=0 to skip the build.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def load(name: str, folder: Path, what: str):
    """The compiled module of ``folder/extension.cpp`` (``name``: the module's name before the sources' tag;
    ``what``: the kernels it holds, for the warning), or None: turned off (``MKA_CPU_FUSED=0``) or it does not build
    here."""
    if os.environ.get(ENV, "1") == "0":
        return None
    return _load(name, str(folder), what)


def _ninja_on_path() -> None:
    """The build runs ``ninja`` from PATH; the ``ninja`` package installs it next to this interpreter, which is not
    on PATH when a virtual environment's python runs without being activated (``.venv/bin/python -m pytest``)."""
    if shutil.which("ninja") is None:
        scripts = sysconfig.get_path("scripts")
        if scripts and (Path(scripts) / "ninja").exists():
            os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
