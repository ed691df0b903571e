"""Tools for a machine with a CUDA GPU (each also runs on the CPU at tiny sizes, so the tests run it here).

- :mod:`tools.gpu.check`: every Triton kernel against its reference, the timings, the goals (table last);
  ``--sweep`` adds the tile sweep (:mod:`.sweep`, :mod:`.tunables`, :mod:`.sweep_candidates`);
- :mod:`tools.gpu.timings`: what a converted model runs, timed: a converted Llama-shaped model's prefill and
  decode tokens/s against the same model unconverted (SDPA), and the ``mka::`` ops it calls, in isolation;
- :mod:`tools.gpu.models_check`: converted models on the GPU, eager and under the ``mka`` backend, against the CPU;
- :mod:`tools.gpu.compile_check`: compiles every Triton kernel for a GPU target on a machine without one;
- ``run.sh``: the one command for a GPU machine without the package installed (GPU tests, then ``check``).
"""
