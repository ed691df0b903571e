"""The support table (``python tools/support/table.py``; writes ``docs/support.md`` and ``docs/support.json``).

- :mod:`tools.support.table`: runs detection, conversion and the checks per model family (worker subprocesses);
- :mod:`tools.support.tiny_models`: builds each family tiny, and the third-party-style models of ``tests/thirdparty``;
- :mod:`tools.support.render`: writes the page from the measured rows.
"""
