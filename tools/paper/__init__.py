"""The MKA paper's tables re-measured at small scale (``python tools/paper/tables.py``).

- :mod:`tools.paper.tables`: the run (six attention variants trained in lock-step, timings, conversion);
- :mod:`tools.paper.lm_variants`: the small decoder LM and its six attention variants;
- :mod:`tools.paper.lm_training`: corpora, training steps, held-out perplexity;
- :mod:`tools.paper.convert_recovery`: a pretrained MHA model converted and fine-tuned (the conversion table);
- :mod:`tools.paper.report`, :mod:`tools.paper.plots`: tables, claims, ``docs/results.md`` and the plots.
"""
