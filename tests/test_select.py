"""`mmtune select` and `select_records`: every method on text-only and image+text pools, bad input, reports.

Models are tiny and random (a 2-layer BERT with the offline MiniLM tokenizer, a
1-layer open_clip ViT, a tiny GPT-2 judge, a tiny BERT reward model); one test
uses the real offline all-MiniLM-L6-v2 default. Nothing is downloaded.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmtune.cli import main
from mmtune.data.schema import Record, read_records, write_records
from mmtune.errors import MMTuneError
from mmtune.select import METHODS, SelectionResult, select_pool, select_records
from mmtune.select.embed import TextEncoder, default_text_model_path, embed_records
from mmtune.select.quality import FieldScorer, LengthScorer, LMJudgeScorer, RewardModelScorer, normalise

FIX = Path(__file__).parent / "fixtures" / "select"
TINY_CLIP = "mmtune-select-test-tiny"


# --------------------------------------------------------------------------- #
# Fixtures: records, pools, tiny models
# --------------------------------------------------------------------------- #


def alpaca_records() -> list[Record]:
    rows = json.loads((FIX / "alpaca_40.json").read_text())
    out = []
    for i, row in enumerate(rows):
        user = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        out.append(Record(id=f"alpaca-{i}", messages=[{"role": "user", "content": user},
                                                     {"role": "assistant", "content": row["output"]}],
                          meta={"score": float(i % 7)}))
    return out


def mm_records(folder: Path) -> list[Record]:
    """The same rows as image+text records (every third text-only), each with a drawn image."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, rec in enumerate(alpaca_records()):
        if i % 3 == 2:
            out.append(rec)
            continue
        img = folder / f"img{i}.png"
        Image.new("RGB", (24 + i, 20), ((37 * i) % 256, (91 * i) % 256, (13 * i) % 256)).save(img)
        msgs = [{"role": "user", "content": "<image>\n" + rec.messages[0]["content"]}, rec.messages[1]]
        out.append(Record(id=f"mm-{i}", messages=msgs, images=[img.name], meta=rec.meta))
    return out


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> str:
    """A 2-layer random BERT saved with the offline MiniLM tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(default_text_model_path())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def image_model(tmp_path_factory) -> str:
    """A 1-layer random open_clip ViT registered under a test-only name."""
    import open_clip

    folder = tmp_path_factory.mktemp("tiny_clip")
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 16, "heads": 1, "layers": 1}}
    path = folder / f"{TINY_CLIP}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return TINY_CLIP


@pytest.fixture()
def text_pool(tmp_path) -> Path:
    path = tmp_path / "pool.jsonl"
    write_records(alpaca_records(), path)
    return path


@pytest.fixture()
def mm_pool(tmp_path) -> Path:
    path = tmp_path / "mm" / "pool.jsonl"
    write_records(mm_records(tmp_path / "mm"), path)  # image paths relative to the pool's folder
    return path


def run_cli(*args: str) -> int:
    return main(["select", *map(str, args)])


# --------------------------------------------------------------------------- #
# Every method, CLI and API, both modes
# --------------------------------------------------------------------------- #

METHOD_ARGS = {
    "random": ["--k", "8"],
    "longest": ["--k", "8"],
    "quality": ["--k", "8"],
    "kmeans": ["--k", "8", "--clusters", "3"],
    "facility": ["--k", "8"],
    "qdit": ["--k", "8", "--alpha", "0.3"],
    "deita": ["--k", "8", "--max-similarity", "0.999"],
    "dedup": ["--max-similarity", "0.999"],
}


def test_every_method_is_covered():
    assert set(METHOD_ARGS) == set(METHODS)


@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_cli_every_method_text_only(method, text_pool, text_model, tmp_path):
    out = tmp_path / "subset.jsonl"
    rc = run_cli(text_pool, "--method", method, "--out", out, "--text-model", text_model, *METHOD_ARGS[method])
    assert rc == 0
    subset = read_records(out)
    pool_ids = [r.id for r in read_records(text_pool)]
    ids = [r.id for r in subset]
    assert len(ids) == len(set(ids)) and set(ids) <= set(pool_ids)
    if method == "dedup":
        assert len(ids) == 40 and ids == pool_ids  # no duplicates in this pool; pool order kept
    else:
        assert len(ids) == 8


@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_cli_every_method_image_text(method, mm_pool, text_model, image_model, tmp_path):
    out = tmp_path / "subset.jsonl"
    rc = run_cli(mm_pool, "--method", method, "--out", out, "--text-model", text_model,
                 "--image-model", image_model, *METHOD_ARGS[method])
    assert rc == 0
    subset = read_records(out)
    assert len(subset) == (40 if method == "dedup" else 8)
    assert all(r.images == [f"img{r.id.split('-')[1]}.png"] for r in subset if r.id.startswith("mm-"))


def test_cli_image_model_from_a_local_open_clip_folder(mm_pool, text_model, tmp_path):
    """`--image-model local-dir:PATH` (README's pipeline): the demo's shipped open_clip tower, no download."""
    from mmtune.demo import DEMO_BASES

    out = tmp_path / "subset.jsonl"
    assert run_cli(mm_pool, "--method", "qdit", "--k", "8", "--out", out, "--text-model", text_model,
                   "--image-model", f"local-dir:{DEMO_BASES / 'clip'}") == 0
    assert len(read_records(out)) == 8


@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_api_every_method_both_modes(method, text_model, image_model, tmp_path):
    from mmtune.select.embed import ImageEncoder

    text_enc = TextEncoder(text_model)
    kwargs = {"k": None if method == "dedup" else 6, "max_similarity": 0.999 if method in ("deita", "dedup") else None}
    for records, img in ((alpaca_records(), None), (mm_records(tmp_path / "mm"), ImageEncoder(image_model))):
        res = select_records(records, method=method, text_encoder=text_enc, image_encoder=img,
                             image_root=tmp_path / "mm", **kwargs)
        assert isinstance(res, SelectionResult)
        assert [r.id for r in res.records] == [records[i].id for i in res.indices]
        assert res.k == len(res.records) == (40 if method == "dedup" else 6)
        if METHODS[method].needs_embeddings:
            assert res.objective is not None and 0 < res.objective <= len(records) + 1e-3


def test_selection_is_deterministic_for_a_seed(text_model):
    recs = alpaca_records()
    enc = TextEncoder(text_model)
    X = embed_records(recs, text_encoder=enc)[0]
    for method in ("random", "kmeans", "qdit"):
        a = select_records(recs, 10, method, embeddings=X, seed=3, similarity="knn", neighbors=8)
        b = select_records(recs, 10, method, embeddings=X, seed=3, similarity="knn", neighbors=8)
        assert a.indices.tolist() == b.indices.tolist()
    assert (select_records(recs, 10, "random", seed=1).indices.tolist()
            != select_records(recs, 10, "random", seed=2).indices.tolist())


# --------------------------------------------------------------------------- #
# What each method picks
# --------------------------------------------------------------------------- #


def test_longest_and_quality_pick_what_they_say():
    recs = alpaca_records()
    lengths = np.array([len(r.assistant_text()) for r in recs])
    res = select_records(recs, 5, "longest")
    assert res.indices.tolist() == np.argsort(-lengths, kind="stable")[:5].tolist()
    res = select_records(recs, 5, "quality", quality_field="score")
    assert all(recs[i].meta["score"] == 6.0 for i in res.indices)  # 40 rows, score = i % 7: five 6s
    res = select_records(recs, None, "quality", quality_field="score", min_quality=0.99)
    assert len(res.records) == 5
    with pytest.raises(MMTuneError, match="only 5 record.*min-quality"):
        select_records(recs, 6, "quality", quality_field="score", min_quality=0.99)


def test_kmeans_takes_even_shares_nearest_first():
    rng = np.random.default_rng(0)
    centers = np.eye(4, 16, dtype=np.float32) * 5
    X = np.concatenate([c + 0.1 * rng.standard_normal((10, 16)).astype(np.float32) for c in centers])
    recs = [Record(id=str(i), messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
            for i in range(40)]
    res = select_records(recs, 8, "kmeans", embeddings=X, clusters=4)
    groups = sorted(i // 10 for i in res.indices)
    assert groups == [0, 0, 1, 1, 2, 2, 3, 3]
    assert sorted(i // 10 for i in res.indices[:4]) == [0, 1, 2, 3]  # round robin by rank
    cov = res.info["cluster_coverage"]
    assert sorted(c["selected"] for c in cov) == [2, 2, 2, 2]


def test_dedup_drops_exact_and_near_duplicates_keeping_the_best():
    recs = alpaca_records()[:10]
    dup = Record(id="dup", messages=[{"role": "user", "content": recs[0].messages[0]["content"].upper()},
                                     {"role": "assistant", "content": "  " + recs[0].messages[1]["content"]}])
    near = Record(id="near", messages=[{"role": "user", "content": recs[1].messages[0]["content"] + " ."},
                                       recs[1].messages[1]])
    pool = recs + [dup, near]
    X = np.random.default_rng(0).standard_normal((12, 32)).astype(np.float32)
    X[11] = X[1] + 1e-3  # "near" is a near duplicate of record 1 in embedding space
    res = select_records(pool, None, "dedup", embeddings=X, max_similarity=0.98)
    ids = [r.id for r in res.records]
    assert "near" not in ids and len(ids) == 10
    assert res.summary["method_info"]["exact_duplicates"] == 1
    assert res.summary["method_info"]["near_duplicates"] == 1
    # --dedup before another method; k larger than what is left is an error, not a short subset
    res = select_records(pool, 9, "facility", embeddings=X, dedup_threshold=0.98)
    assert res.skipped["duplicates_removed"] == 2 and len(res.records) == 9
    with pytest.raises(MMTuneError, match="k=11 but only 10 usable"):
        select_records(pool, 11, "facility", embeddings=X, dedup_threshold=0.98)


def test_deita_walks_by_quality_and_errors_when_it_runs_out():
    X = np.array([[1, 0], [1, 0.01], [0, 1], [0.6, 0.8]], dtype=np.float32)
    recs = [Record(id=str(i), messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                   meta={"q": float(q)}) for i, q in enumerate([1, 4, 3, 2])]
    res = select_records(recs, 3, "deita", embeddings=X, quality_field="q", max_similarity=0.9)
    assert [r.id for r in res.records] == ["1", "2", "3"]
    with pytest.raises(MMTuneError, match="deita: only 3 record.*raise --max-similarity"):
        select_records(recs, 4, "deita", embeddings=X, quality_field="q", max_similarity=0.9)


def test_qdit_quality_weight_moves_the_subset():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((60, 8)).astype(np.float32)
    recs = [Record(id=str(i), messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                   meta={"q": float(rng.random())}) for i in range(60)]
    low = select_records(recs, 10, "qdit", embeddings=X, quality_field="q", alpha=0.0)
    high = select_records(recs, 10, "qdit", embeddings=X, quality_field="q", alpha=0.9)
    assert high.summary["objective"]["quality_mean_subset"] > low.summary["objective"]["quality_mean_subset"]
    assert low.objective > high.objective
    fac = select_records(recs, 10, "facility", embeddings=X)
    assert fac.indices.tolist() == low.indices.tolist()


# --------------------------------------------------------------------------- #
# Embeddings
# --------------------------------------------------------------------------- #


def test_default_text_encoder_is_the_offline_minilm():
    enc = TextEncoder()
    assert enc.name == "hf:all-MiniLM-L6-v2" and enc.max_length == 256
    v = enc.encode(["How do I bake bread?", "Give me a bread recipe.", "What is the capital of France?"])
    assert v.shape == (3, 384)
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2  # a real sentence encoder, not random weights


def test_image_text_embedding_is_the_normalised_concatenation(text_model, image_model, tmp_path):
    from mmtune.select.embed import ImageEncoder, record_text

    recs = mm_records(tmp_path)[:3]  # two image+text, one text-only
    t_enc, i_enc = TextEncoder(text_model), ImageEncoder(image_model)
    X, bad = embed_records(recs, text_encoder=t_enc, image_encoder=i_enc, image_root=tmp_path)
    assert not bad and X.shape == (3, 32 + 16)
    t = t_enc.encode([record_text(r) for r in recs])
    v = i_enc.encode([Image.open(tmp_path / recs[0].images[0]).convert("RGB")])[0]
    assert np.allclose(X[0, :32], t[0] / np.sqrt(2), atol=1e-5)
    assert np.allclose(X[0, 32:], v / np.sqrt(2), atol=1e-4)
    assert np.allclose(X[2], np.concatenate([t[2], np.zeros(16)]), atol=1e-5)  # text-only: [t, 0]
    assert np.allclose(np.linalg.norm(X, axis=1), 1, atol=1e-5)
    assert "<image>" not in record_text(recs[0])


def test_embedding_cache_is_keyed_by_content(text_model, tmp_path):
    calls = []

    class Counting(TextEncoder):
        def encode(self, items, *, progress=False):
            calls.append(len(items))
            return super().encode(items, progress=progress)

    enc = Counting(text_model)
    recs = alpaca_records()[:5]
    a, _ = embed_records(recs, text_encoder=enc, cache_path=tmp_path / "pool.jsonl")
    b, _ = embed_records(recs, text_encoder=enc, cache_path=tmp_path / "pool.jsonl")
    assert calls == [5] and np.array_equal(a, b)
    assert len(list(tmp_path.glob("pool.jsonl.emb-*.npy"))) == 1
    recs[0].messages[0]["content"] += " (changed)"
    embed_records(recs, text_encoder=enc, cache_path=tmp_path / "pool.jsonl")
    assert calls == [5, 5] and len(list(tmp_path.glob("pool.jsonl.emb-*.npy"))) == 2


def test_cli_caches_embeddings_next_to_the_pool_and_reuses_them(text_pool, text_model, tmp_path):
    for _ in range(2):
        assert run_cli(text_pool, "--k", "5", "--method", "facility", "--out", tmp_path / "s.jsonl",
                       "--text-model", text_model) == 0
    cached = list(text_pool.parent.glob("pool.jsonl.emb-*.npy"))
    assert len(cached) == 1 and np.load(cached[0]).shape == (40, 32)
    # a cached file is also a valid --embeddings input
    assert run_cli(text_pool, "--k", "5", "--method", "facility", "--out", tmp_path / "t.jsonl",
                   "--embeddings", cached[0]) == 0
    assert read_records(tmp_path / "s.jsonl") == read_records(tmp_path / "t.jsonl")


# --------------------------------------------------------------------------- #
# Quality scorers
# --------------------------------------------------------------------------- #


def test_length_and_field_scorers_and_normalise():
    recs = alpaca_records()
    raw = LengthScorer().score(recs)
    assert raw.tolist() == [float(np.log1p(len(r.assistant_text()))) for r in recs]
    assert FieldScorer("score").score(recs)[:8].tolist() == [0, 1, 2, 3, 4, 5, 6, 0]
    q = normalise(np.array([1.0, 2.0, 3.0]))
    assert q.tolist() == [0.0, 0.5, 1.0]
    assert normalise(np.array([2.0, 2.0])).tolist() == [1.0, 1.0]
    big = normalise(np.r_[np.arange(200.0), 1e9])  # one outlier does not squash the rest
    assert big[100] == pytest.approx(0.5, abs=0.02) and big[-1] == 1.0
    recs[3].meta = {}
    with pytest.raises(MMTuneError, match=r"meta.score is missing or not a finite number in 1 of 40.*'alpaca-3'"):
        FieldScorer("score").score(recs)


def test_reward_model_scorer(tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(default_text_model_path())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, num_labels=1)
    BertForSequenceClassification(cfg).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    recs = alpaca_records()[:5]
    scorer = RewardModelScorer(str(tmp_path / "rm"), batch_size=2)
    scores = scorer.score(recs)
    assert scores.shape == (5,) and np.isfinite(scores).all() and len(set(scores.round(6))) > 1
    assert np.allclose(scores, scorer.score(recs[::-1])[::-1], atol=1e-5)  # batching does not leak
    res = select_records(alpaca_records(), 4, "quality", quality="reward", quality_model=str(tmp_path / "rm"))
    assert res.params["quality"].startswith("reward:")


def test_lm_judge_reads_the_expected_rating(tmp_path):
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(default_text_model_path())
    model = GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=1, n_head=2, n_positions=512))
    model.save_pretrained(tmp_path / "judge")
    tok.save_pretrained(tmp_path / "judge")
    recs = alpaca_records()[:4]
    judge = LMJudgeScorer(str(tmp_path / "judge"), batch_size=3)
    probs = judge.rating_probs(recs)
    assert probs.shape == (4, 5) and np.allclose(probs.sum(axis=1), 1)
    scores = judge.score(recs)
    assert np.allclose(scores, probs @ np.arange(1, 6)) and ((scores >= 1) & (scores <= 5)).all()
    # the same number by hand: softmax over the vocabulary, renormalised over the tokens "1".."5"
    enc = judge.tokenizer(judge._text(recs[0]), return_tensors="pt")
    with torch.no_grad():
        p = torch.softmax(judge.model(**enc).logits[0, -1], dim=-1)
    ids = [tok.convert_tokens_to_ids(str(r)) for r in range(1, 6)]
    manual = (p[ids] / p[ids].sum()).numpy() @ np.arange(1, 6)
    assert scores[0] == pytest.approx(manual, abs=1e-4)
    zero = LMJudgeScorer(str(tmp_path / "judge"), scale="0-5")
    assert zero.rating_probs(recs[:1]).shape == (1, 6)
    with pytest.raises(MMTuneError, match="must contain"):
        LMJudgeScorer(str(tmp_path / "judge"), prompt="no fields")


def test_quality_models_that_cannot_load_are_one_line_errors(tmp_path):
    with pytest.raises(MMTuneError, match="needs --quality-model"):
        select_records(alpaca_records(), 3, "quality", quality="judge")
    with pytest.raises(MMTuneError, match="cannot load reward model"):
        select_records(alpaca_records(), 3, "quality", quality="reward", quality_model=str(tmp_path / "none"))


# --------------------------------------------------------------------------- #
# Bad input: one-line errors (exit 2) or counted skips, never a short subset
# --------------------------------------------------------------------------- #


def cli_error(capsys, *args) -> str:
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmtune select: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_empty_pool(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    err = cli_error(capsys, tmp_path / "empty.jsonl", "--k", "3", "--method", "random", "--out", tmp_path / "o.jsonl")
    assert "empty" in err


def test_k_larger_than_pool(text_pool, tmp_path, capsys):
    err = cli_error(capsys, text_pool, "--k", "41", "--method", "longest", "--out", tmp_path / "o.jsonl")
    assert "k=41 but only 40 usable record(s)" in err
    assert not (tmp_path / "o.jsonl").exists()
    err = cli_error(capsys, text_pool, "--k", "0", "--method", "longest", "--out", tmp_path / "o.jsonl")
    assert "positive integer" in err
    err = cli_error(capsys, text_pool, "--method", "longest", "--out", tmp_path / "o.jsonl")
    assert "needs k" in err


def test_records_without_assistant_text_are_counted_skips(tmp_path, capsys):
    recs = alpaca_records()[:6] + [Record(id="q-only", messages=[{"role": "user", "content": "no answer"}])]
    write_records(recs, tmp_path / "pool.jsonl")
    assert run_cli(tmp_path / "pool.jsonl", "--k", "6", "--method", "longest", "--out", tmp_path / "o.jsonl",
                   "--rejects", tmp_path / "rej.jsonl") == 0
    assert "skipped: 1 no assistant text" in capsys.readouterr().err
    assert len(read_records(tmp_path / "o.jsonl")) == 6
    rej = [json.loads(x) for x in (tmp_path / "rej.jsonl").read_text().splitlines()]
    assert len(rej) == 1 and "q-only" in rej[0]["reason"]
    err = cli_error(capsys, tmp_path / "pool.jsonl", "--k", "7", "--method", "longest", "--out", tmp_path / "o.jsonl")
    assert "k=7 but only 6 usable record(s)" in err and "1 no assistant text skipped" in err


def test_bad_lines_in_a_unified_pool_are_an_error_with_a_count(text_pool, tmp_path, capsys):
    lines = text_pool.read_text().splitlines()
    lines[3] = "{not json"
    lines[7] = json.dumps({"id": "x", "messages": []})
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    err = cli_error(capsys, bad, "--k", "3", "--method", "random", "--out", tmp_path / "o.jsonl")
    assert "2 bad line(s)" in err and "bad.jsonl:4" in err


def test_nan_and_mismatched_embeddings(text_pool, tmp_path, capsys):
    X = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    X[5, 2] = np.nan
    np.save(tmp_path / "nan.npy", X)
    err = cli_error(capsys, text_pool, "--k", "3", "--method", "facility", "--out", tmp_path / "o.jsonl",
                    "--embeddings", tmp_path / "nan.npy")
    assert "1 row(s) contain NaN/inf (first: row 5)" in err
    np.save(tmp_path / "short.npy", X[:30])
    err = cli_error(capsys, text_pool, "--k", "3", "--method", "facility", "--out", tmp_path / "o.jsonl",
                    "--embeddings", tmp_path / "short.npy")
    assert "30 embedding rows but the pool has 40 records" in err
    (tmp_path / "junk.npy").write_text("not numpy")
    err = cli_error(capsys, text_pool, "--k", "3", "--method", "facility", "--out", tmp_path / "o.jsonl",
                    "--embeddings", tmp_path / "junk.npy")
    assert "not a readable .npy" in err


def test_missing_image_is_a_counted_skip(mm_pool, text_model, image_model, tmp_path, capsys):
    (mm_pool.parent / "img0.png").unlink()
    (mm_pool.parent / "img1.png").write_bytes(b"not a png")
    res = select_pool(mm_pool, 5, "facility", out=tmp_path / "o.jsonl", text_model=text_model,
                      image_model=image_model, rejects=tmp_path / "rej.jsonl")
    assert res.skipped == {"image_unreadable": 2} and len(read_records(tmp_path / "o.jsonl")) == 5
    reasons = [json.loads(x)["reason"] for x in (tmp_path / "rej.jsonl").read_text().splitlines()]
    assert "not found" in reasons[0] and "cannot be decoded" in reasons[1]
    assert res.summary["pool"]["usable"] == 38


def test_images_without_an_image_model(mm_pool, text_model, tmp_path, capsys):
    err = cli_error(capsys, mm_pool, "--k", "3", "--method", "facility", "--out", tmp_path / "o.jsonl",
                    "--text-model", text_model)
    assert "have images but no image encoder" in err
    assert run_cli(mm_pool, "--k", "3", "--method", "facility", "--out", tmp_path / "o.jsonl",
                   "--text-model", text_model, "--text-only") == 0


def test_dedup_method_takes_no_k(text_pool, text_model, tmp_path, capsys):
    err = cli_error(capsys, text_pool, "--k", "3", "--method", "dedup", "--out", tmp_path / "o.jsonl",
                    "--text-model", text_model)
    assert "takes no --k" in err


# --------------------------------------------------------------------------- #
# Raw formats, report
# --------------------------------------------------------------------------- #


def test_raw_alpaca_pool_with_report(tmp_path, text_model):
    report = tmp_path / "R"
    assert run_cli(FIX / "alpaca_40.json", "--k", "10", "--method", "qdit", "--out", tmp_path / "o.jsonl",
                   "--report", report, "--text-model", text_model, "--no-cache") == 0
    subset = read_records(tmp_path / "o.jsonl")
    assert len(subset) == 10 and all(r.id.startswith("alpaca_40-") for r in subset)
    assert not list(FIX.glob("*.npy"))  # --no-cache: nothing written next to the fixture
    sel = json.loads((report / "selection.json").read_text())
    assert sel["method"] == "qdit" and sel["k"] == 10 and sel["parameters"]["alpha"] == 0.5
    assert sel["objective"]["facility_location"] > 0 and sel["seconds"]["select_seconds"] >= 0
    assert sum(c["pool"] for c in sel["cluster_coverage"]) == 40
    assert sum(c["selected"] for c in sel["cluster_coverage"]) == 10
    assert "converted in memory from alpaca format" in sel["notes"][0]
    assert set(sel["plots"]) == {"clusters.png", "lengths.png", "embedding_map.png", "verbs.png"}
    for name in sel["plots"]:
        with Image.open(report / name) as img:
            assert img.format == "PNG" and img.size[0] > 400
    verbs = sel["verb_noun"]["pool"]["verbs"]
    assert verbs and verbs[0]["count"] >= verbs[-1]["count"]


def test_report_notes_a_missing_spacy_model(tmp_path, monkeypatch):
    from mmtune.select import report

    monkeypatch.setattr(report, "SPACY_MODEL", "no_such_spacy_model_xyz")
    X = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    res = select_records(alpaca_records(), 5, "facility", embeddings=X, report_dir=tmp_path / "R")
    assert "verbs.png" not in res.summary["plots"]
    assert any("no_such_spacy_model_xyz is not installed" in n for n in res.summary["notes"])
    assert (tmp_path / "R" / "lengths.png").is_file()


def test_webdataset_shard_pool_image_text(mm_pool, text_model, image_model, tmp_path):
    from mmtune.data.shards import write_shards

    shards = tmp_path / "shards"
    write_shards(mm_pool, shards, max_count=15, image_root=mm_pool.parent)
    assert len(list(shards.glob("*.tar"))) == 3
    out = tmp_path / "sel" / "subset.jsonl"
    assert run_cli(shards, "--k", "6", "--method", "qdit", "--out", out, "--text-model", text_model,
                   "--image-model", image_model) == 0
    subset = read_records(out)
    assert len(subset) == 6
    images = [p for r in subset for p in r.images]
    assert images and all(Path(p).parent == out.parent / "subset_images" and Path(p).is_file() for p in images)
    # the same records as selecting from the JSONL the shards were written from
    assert run_cli(mm_pool, "--k", "6", "--method", "qdit", "--out", tmp_path / "direct.jsonl",
                   "--text-model", text_model, "--image-model", image_model) == 0
    assert [r.id for r in subset] == [r.id for r in read_records(tmp_path / "direct.jsonl")]


def test_out_defaults_to_the_report_folder(text_pool, text_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_cli(text_pool, "--k", "4", "--method", "longest", "--report", "R", "--text-model", text_model) == 0
    assert len(read_records(tmp_path / "R" / "subset.jsonl")) == 4
    assert run_cli(text_pool, "--k", "3", "--method", "longest") == 0
    assert len(read_records(tmp_path / "pool.longest-3.jsonl")) == 3
