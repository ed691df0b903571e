"""The long-context benchmark of issue 14 (``python tools/long_context``, ``mka-compile longctx``), by its seams:

- :mod:`tools.long_context.tasks`: byte tokens, filler text, the retrieval samples (passkey, multi-key, key-value);
- :mod:`tools.long_context.model`: the small byte-level Llama, its training (cached by settings) and the variants;
- :mod:`tools.long_context.measure`: retrieval accuracy, streaming perplexity, resident bytes, decode and prefill time;
- :mod:`tools.long_context.report`: the plots and ``docs/long_context.md``;
- :mod:`tools.long_context.bench`: the run (settings, variants, goals) and ``main``.
"""
