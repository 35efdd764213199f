"""mmtune.train: the training recipe (`run.train`) and its components.

`run` is the recipe behind `mmtune train`; `checkpoint` writes and finds
checkpoint folders; `metrics` writes metrics.jsonl / TensorBoard / loss.png;
`trainer` holds the optimizer, schedule, precision and the guards (signals,
NaN, out of memory, fault injection for tests).
"""

from mmtune.train.run import TrainResult, train

__all__ = ["TrainResult", "train"]
