"""The tvlens model organisms: the training script (``python -m tvlens.organisms.text.train``), the check
script (``python -m tvlens.organisms.text.check``), the word-level tokenizer and the shipped checkpoints
(``checkpoints/organism``, ``checkpoints/organism-natural``; load them with
``tvlens.load_model("organism")``). See ``README.md`` in this directory (the model card)."""
