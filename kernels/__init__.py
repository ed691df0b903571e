"""The ``mka::`` custom ops: one module or folder per op family (reference, registration; Triton on GPU).

Importing this package registers every op with ``torch.library``:

- ``mka::session_scan`` (+ ``_backward``): L2 session EMA with carried float32 state;
- ``mka::chunk_update`` (+ ``_backward``) and ``mka::recall_select``: L3 chunk summaries and recall;
- ``mka::route_mix`` (+ ``_backward``): FastMKA's routed mix of K/V levels;
- ``mka::mka_attention`` (+ ``_backward``): MKA's multi-level attention;
- ``mka::flash_attention`` (+ ``_backward``): plain attention sites (GQA, causal, masks).

Each family declares its ops with :func:`.declare.declare` (the op, its fake, its backward op and the autograd,
from the typed reference); with triton installed, each family's Triton module registers its launchers as the CUDA
implementations (:meth:`.declare.Op.implement_cuda`).
"""

from __future__ import annotations

if __name__ == "kernels":  # the checkout's root is on sys.path: this folder is not the `kernels` asked for
    from ._checkout import hand_over

    hand_over(__name__, __file__)
else:
    from ._ops import *  # noqa: F403
    from ._ops import __all__  # noqa: F401
