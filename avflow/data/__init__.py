"""Data stage: on-disk layouts -> aligned per-frame arrays at the mel frame rate -> training windows.

Everything here is plain numpy/torch with no model knowledge, so the model stage can depend on it and
not the other way round.
"""
