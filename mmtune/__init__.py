"""mmtune: instruction tuning for LLMs and LLaVA-style multimodal LLMs.

Data flows one way: records (`mmtune.data`) -> selection (`mmtune.select`) ->
tokens/batches -> model (`mmtune.model`) -> training (`mmtune.train`) ->
metrics (`mmtune.eval`). Lower layers never import higher ones.
"""

__version__ = "0.1.0"
