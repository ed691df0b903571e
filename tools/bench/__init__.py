"""CPU benchmarks (ratios measured side by side in one run; never asserted in tests).

- :mod:`tools.bench.conversion`: a converted model against the original, forward and forward+backward;
- :mod:`tools.bench.decode`: the same, decoding with the cache (greedy and beam search);
- :mod:`tools.bench.detection`: ``mka_compile.inspect`` on a deep tiny Llama;
- :mod:`tools.bench.cpu_ops`: the ``mka::`` ops and MKA layers against simple baselines.
"""
