"""The tile sweep's data (tools/gpu/sweep.py): candidate launch configurations per kernel, a small set for the
interpreter smoke run, and where each kernel's default lives (for adopting a winner)."""

from __future__ import annotations

# Candidates per kernel on a GPU (the launcher's default is always timed first). Attention tiles are
# (BLOCK_M, BLOCK_N, num_warps, num_stages).
GPU_CANDIDATES: dict[str, list[tuple]] = {
    "flash_fwd": [
        (128, 64, 8, 2),
        (128, 64, 8, 4),
        (128, 128, 8, 2),
        (128, 128, 8, 3),
        (128, 64, 4, 3),
        (128, 32, 8, 3),
        (64, 64, 4, 3),
        (64, 64, 4, 4),
        (64, 128, 4, 3),
        (64, 128, 8, 3),
        (64, 32, 4, 4),
        (128, 64, 8, 3),
    ],
    "flash_dkdv": [
        (32, 64, 4, 3),
        (32, 128, 8, 3),
        (32, 128, 4, 2),
        (64, 64, 8, 3),
        (64, 128, 8, 2),
        (16, 64, 4, 3),
        (32, 64, 4, 4),
        (64, 64, 4, 2),
        (32, 64, 8, 3),
    ],
    "flash_dq": [
        (64, 32, 4, 4),
        (64, 64, 4, 3),
        (64, 64, 8, 3),
        (128, 32, 8, 3),
        (128, 64, 8, 2),
        (32, 32, 4, 3),
        (64, 32, 8, 3),
        (128, 32, 4, 2),
        (64, 32, 4, 3),
    ],
    "mka_fwd": [
        (64, 32, 4, 3),
        (64, 64, 4, 2),
        (64, 64, 8, 2),
        (128, 32, 8, 2),
        (128, 64, 8, 2),
        (64, 32, 8, 2),
        (32, 32, 4, 2),
        (64, 16, 4, 3),
        (64, 32, 4, 2),
    ],
    "mka_bwd": [(32, 32, 4, 2), (64, 64, 8, 2), (64, 32, 8, 1), (64, 32, 4, 2)],
}
# CPU (--smoke, Triton interpreter): one alternative each, to run the sweep's code path.
SMOKE_CANDIDATES: dict[str, list[tuple]] = {  # bigger tiles = fewer programs = faster interpreted
    "flash_fwd": [(64, 64, 1, 1)],
    "flash_dkdv": [(64, 64, 1, 1)],
    "flash_dq": [(64, 64, 1, 1)],
    "mka_fwd": [(32, 32, 1, 1)],
    "mka_bwd": [(32, 32, 1, 1)],
}


# Where each kernel's default lives (for adopting a winner); {key} is the table key (element size, head dim).
WHERE = {
    "flash_fwd": "FWD_CONFIGS[{key}] in kernels/flash_attention/plumbing.py",
    "flash_dkdv": "DKDV_CONFIGS[{key}] in kernels/flash_attention/plumbing.py",
    "flash_dq": "DQ_CONFIGS[{key}] in kernels/flash_attention/plumbing.py",
    "mka_fwd": "_config in kernels/mka_attention/triton_launch.py",
    "mka_bwd": "_config in kernels/mka_attention/triton_launch.py (shared with the forward)",
}
