"""Keep the checkout's top-level folders from shadowing installed packages of the same name.

``kernels/`` and ``passes/`` are installed as ``mka_compile.kernels`` and ``mka_compile.passes``. When the
checkout's root is on ``sys.path`` (``python -c`` or ``python -m pytest`` started in the checkout, a notebook
there), ``import kernels`` would find this folder before an installed ``kernels`` package (transformers depends
on one) and break it. Imported under such a top-level name, the folder hands over: it imports the installed
package of that name from the rest of ``sys.path``, or fails as if the folder were not there.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def hand_over(name: str, init_file: str) -> None:
    """Replace ``sys.modules[name]`` (this folder, being imported as ``name``) by the package ``name`` found on
    ``sys.path`` without the checkout's root; raise ``ModuleNotFoundError`` when there is none."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    for key in [k for k in sys.modules if k.startswith(name + ".")]:  # this folder's helper modules
        del sys.modules[key]
    if spec is None:
        del sys.modules[name]
        raise ModuleNotFoundError(
            f"No module named {name!r} (the checkout's {name}/ folder is the package mka_compile.{name})", name=name
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
