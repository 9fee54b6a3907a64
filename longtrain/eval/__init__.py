"""Long-context evaluation (`longtrain-eval`): passkey / needle accuracy over a (length x
depth) grid and perplexity vs length, scored with one forward per prompt on any TP x CP x DP
layout (`runner.py`), or with transformers for exported checkpoints (`hf_backend.py`)."""
