"""Bundled text corpora (installed as ``mka_compile.data``); attribution in ``README.md`` beside this file."""
