"""The 29 character CTC labels of the wav2vec2 base LibriSpeech-960h ASR model that conditions AV-Flow.

The order is the published one ('-' is the CTC blank, '|' the word delimiter); token logit arrays
everywhere in avflow use it.
The order and the Hugging Face vocabulary ids it maps from: docs/reference.md, "ASR tokens".
"""

TOKEN_LABELS = ("-", "|", "E", "T", "A", "O", "N", "I", "H", "S", "R", "D", "L", "U", "M", "W", "C", "F",
                "G", "Y", "P", "B", "V", "K", "'", "X", "J", "Q", "Z")
BLANK = 0
WORD_DELIMITER = 1
LABEL_INDEX = {label: i for i, label in enumerate(TOKEN_LABELS)}

# Hugging Face Wav2Vec2ForCTC vocabulary ids of the same model: <pad>=0 is the blank, ids 4..31 follow
# the published label order, so these columns of its logits give our 29 labels in order.
HF_VOCAB_COLUMNS = (0,) + tuple(range(4, 32))
