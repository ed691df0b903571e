"""The glue to Hugging Face transformers: :mod:`.attention` (a site answers its attention through
``AttentionInterface``: MKA mode and bounded memory), :mod:`.cache` (the MKA state follows a transformers cache
through beam reorders, batch edits and crops), :mod:`.bounded` (bounded memory's keys as a transformers cache
layer), :mod:`.compat` (names that changed across transformers 5.x)."""
