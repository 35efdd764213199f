"""mmtune.train: the training recipe (`run.train`) and its components.

`run` is the recipe behind `mmtune train`; `checkpoint` writes and finds
checkpoint folders; `metrics` writes metrics.jsonl / TensorBoard / loss.png;
`optim` builds the optimizer, schedule and autocast precision; `guards` what
stops a run cleanly (signals, NaN, out of memory) and fault injection for tests.
"""

from mmtune.train.run import TrainResult, train

__all__ = ["TrainResult", "train"]
