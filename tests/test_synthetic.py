from pathlib import Path

from PIL import Image

from mmtune.data.schema import validate_record
from mmtune.data.synthetic import COLOURS, IMAGE_TASKS, PHRASINGS, TEXT_TASKS, Thing, draw_scene, make_pool


def test_pool_is_valid_deterministic_and_answers_are_right(tmp_path: Path) -> None:
    a = make_pool(tmp_path / "a", per_task=12, seed=3)
    b = make_pool(tmp_path / "b", per_task=12, seed=3)
    assert [r.messages for r in a] == [r.messages for r in b]
    assert {r.task for r in a} == set(IMAGE_TASKS + TEXT_TASKS)
    for r in a:
        validate_record(r.to_dict())
        answer = r.turns("assistant")[0]
        assert r.answers == [answer] * 10
        q = r.user_text()
        if r.task == "add":
            x, y = [int(t) for t in q.replace("?", " ").replace(".", " ").replace("=", " ").replace("+", " ").split() if t.isdigit()]
            assert answer == str(x + y)
        if r.task == "reverse":
            assert answer[::-1] in q
        if r.images:
            img = Image.open(r.images[0])
            assert img.size == (64, 64)


def test_phrasing_restriction(tmp_path: Path) -> None:
    pool = make_pool(tmp_path, per_task=20, tasks=("colour", "add"), phrasings=(3,))
    assert {r.meta["phrasing"] for r in pool} == {3}
    colour_q = {r.user_text().split("\n")[-1].split("the ")[0] for r in pool if r.task == "colour"}
    assert colour_q == {PHRASINGS["colour"][3].split("the ")[0]} or all("what colour" in q for q in colour_q)


def test_drawn_colours_are_where_the_scene_says(tmp_path: Path) -> None:
    img = draw_scene([Thing("square", "red", 0, 0), Thing("circle", "blue", 2, 1)], size=60)
    assert img.getpixel((10, 15)) == COLOURS["red"]
    assert img.getpixel((50, 45)) == COLOURS["blue"]
    assert img.getpixel((30, 15)) == (245, 245, 240)


def test_every_task_has_the_same_number_of_distinct_phrasings() -> None:
    """The demo keeps the last phrasing of every task back (N_PHRASINGS - 1): each task must have that many."""
    from mmtune.data.synthetic import N_PHRASINGS

    for task, phrasings in PHRASINGS.items():
        assert len(phrasings) == N_PHRASINGS and len(set(phrasings)) == N_PHRASINGS, task
