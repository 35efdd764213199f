"""Does the demo's pretrained tower see what the demo's vision tasks ask? Probes on its patch features.

    python scripts/probe_demo_tower.py [--layers 1 -2 -1] [--n 1200]

Draws scenes of the demo's pool (mmtune.data.synthetic, a seed the pool and
eval sets do not use), takes the shipped open_clip tower's patch features at
each `--layers` entry through mmtune's own tower (the demo's settings: patch
tokens, pad to square), and fits two probes (scikit-learn), printing the
held-out quarter's accuracy next to the same probe on raw pixels:

- colour: a logistic regression names a one-shape scene's colour;
- position: the demo's position question ("Is the red circle left or right of
  the blue square?") answered by a one-hidden-layer MLP from the patch
  features plus one-hot codes of the two colours the question names (the
  question's binding given for free, which the LM must learn to do itself).

High accuracy says the tower carries what the task needs; what the demo's
projector and LM make of it is another matter.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

PROBE_SEED = 930_003  # not the pool's, the eval sets' or the pretraining corpora's


def scenes(n: int) -> tuple[list, np.ndarray]:
    from mmtune.data import synthetic

    rng = random.Random(PROBE_SEED)
    colours = list(synthetic.COLOURS)
    images, labels = [], []
    for _ in range(n):
        things, _, _ = synthetic._image_example("colour", rng)
        thing = things[0]
        images.append(synthetic.draw_scene([thing]))
        labels.append(colours.index(thing.colour))
    return images, np.array(labels)


def position_scenes(n: int) -> tuple[list, np.ndarray, np.ndarray]:
    """Two-shape scenes of the position task: images, the question's two colours one-hot [N, 12], answer (left=1)."""
    from mmtune.data import synthetic

    rng = random.Random(PROBE_SEED + 1)
    colours = list(synthetic.COLOURS)
    eye = np.eye(len(colours))
    images, named, labels = [], [], []
    for _ in range(n):
        things, _, answer = synthetic._image_example("position", rng)
        a, b = things
        images.append(synthetic.draw_scene(things))
        named.append(np.concatenate([eye[colours.index(a.colour)], eye[colours.index(b.colour)]]))
        labels.append(answer == "left")
    return images, np.stack(named), np.array(labels)


def tower_features(images: list, layer: int) -> np.ndarray:
    from mmtune.config import VisionConfig
    from mmtune.demo import DEMO_BASES
    from mmtune.model.towers import build_vision_tower

    cfg = VisionConfig(backend="open_clip", model_name=f"local-dir:{(DEMO_BASES / 'clip').resolve()}",
                       feature_layer=layer, select_strategy="patch", pad_to_square=True)
    tower = build_vision_tower(cfg).eval()
    transform = tower.image_transform(True)
    with torch.no_grad():
        return tower(torch.stack([transform(im) for im in images])).flatten(1).float().numpy()  # [N, patches*width]


def probe(x: np.ndarray, y: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cut = len(y) * 3 // 4
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(x[:cut], y[:cut])
    return float(clf.score(x[cut:], y[cut:]))


def mlp_probe(x: np.ndarray, y: np.ndarray) -> float:
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cut = len(y) * 3 // 4
    clf = make_pipeline(StandardScaler(), MLPClassifier((256,), max_iter=500, random_state=0))
    clf.fit(x[:cut], y[:cut])
    return float(clf.score(x[cut:], y[cut:]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[1, -2, -1], help="tower hidden states to probe")
    ap.add_argument("--n", type=int, default=1200, help="scenes (3/4 fit, 1/4 held out)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    images, y = scenes(args.n)
    print(f"colour of a one-shape scene, {len(y)} scenes ({len(y) - len(y) * 3 // 4} held out), 6 colours, "
          f"majority share {np.bincount(y).max() / len(y):.2f}")
    for layer in args.layers:
        print(f"  tower hidden state {layer:>3}: held-out accuracy {probe(tower_features(images, layer), y):.3f}")
    pixels = np.stack([np.asarray(im.resize((8, 8))) for im in images]).reshape(len(images), -1) / 255.0
    print(f"  8 x 8 raw pixels     : held-out accuracy {probe(pixels, y):.3f}")
    images, named, y = position_scenes(args.n)
    print(f"position question (left / right of a second shape), {len(y)} scenes, MLP on features + the two "
          f"named colours, majority share {max(y.mean(), 1 - y.mean()):.2f}")
    for layer in args.layers:
        x = np.concatenate([tower_features(images, layer), named], 1)
        print(f"  tower hidden state {layer:>3}: held-out accuracy {mlp_probe(x, y):.3f}")
    pixels = np.stack([np.asarray(im.resize((16, 16))) for im in images]).reshape(len(images), -1) / 255.0
    print(f"  16 x 16 raw pixels   : held-out accuracy {mlp_probe(np.concatenate([pixels, named], 1), y):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
