"""A converted attention site at run time: :mod:`.hooks` attaches MKA to the site module (the converted-site
class, the pre-hook that opens a call, the projection hooks), :mod:`.inputs` reads what a call was given (real
tokens, the cache, eager or traced), :mod:`.memory` holds :class:`~mka_compile.sites.memory.SiteMemory` (the
site's router, gate and settings, and the memory levels it mixes into K/V)."""
