"""Text stage: written text -> spoken words -> input symbols (letters or phonemes), the ASR token label order,
rule-based token logits, and transcripts and durations read back from token logits.

It knows nothing of datasets or models, so the data, model, training and inference stages can all use it.
"""
