"""Alignment analyses on tiny random Llama models (built from a config, nothing downloaded)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from tokenizers.pre_tokenizers import ByteLevel
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mmtune.eval.analysis import (
    AnalysisError,
    LMJudge,
    answer_logprobs,
    knowledge_consistency,
    pairwise_judge,
    pearson,
    plot_token_shift,
    shift_category,
    token_distribution_shift,
)

PROMPTS = ["Hello there", "What is the capital of France?", "Hi", "List three colors:"]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges: one token per byte, no files needed."""
    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    for special in ("<s>", "</s>", "<pad>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _tiny_llama(tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model_a(tokenizer):
    return _tiny_llama(tokenizer, 0)


@pytest.fixture(scope="module")
def model_b(tokenizer):
    return _tiny_llama(tokenizer, 1)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by full forward passes (no cache), i.e. the model's own argmax tokens."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([seq]), attention_mask=torch.ones(1, len(seq), dtype=torch.long)).logits
            seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.fixture(scope="module")
def shift_inputs(tokenizer, model_a):
    prompts = [_ids(tokenizer, p) for p in PROMPTS]
    conts = [_greedy(model_a, p, n) for p, n in zip(prompts, (6, 9, 4, 7))]
    return prompts, conts


# --------------------------------------------------------------------------- #
# Token distribution shift
# --------------------------------------------------------------------------- #


def test_shift_categories() -> None:
    assert [shift_category(r) for r in (1, 2, 3, 4, 100)] == ["unshifted", "marginal", "marginal", "shifted", "shifted"]


def test_model_against_itself_is_all_unshifted(model_a, tokenizer, shift_inputs) -> None:
    prompts, conts = shift_inputs
    res = token_distribution_shift(model_a, prompts, conts, tokenizer=tokenizer, batch_size=3, progress=False)
    assert res.n_tokens == sum(map(len, conts)) == 26
    assert res.counts == {"unshifted": 26, "marginal": 0, "shifted": 0}
    assert res.shares["unshifted"] == 1.0 and res.top_shifted == []


def test_model_against_another_model_shifts(model_a, model_b, tokenizer, shift_inputs) -> None:
    prompts, conts = shift_inputs
    res = token_distribution_shift(model_b, prompts, conts, tokenizer=tokenizer, batch_size=2, top_k=1000, progress=False)
    assert res.n_tokens == 26
    assert res.counts["shifted"] > 0 and res.counts["unshifted"] < 26
    top = res.top_shifted[0]
    assert isinstance(top["token"], str) and top["count"] >= 1 and isinstance(top["base_top_token"], str)
    assert sum(t["count"] for t in res.top_shifted) == res.counts["shifted"]
    assert len(res.by_position) == 9 and res.by_position[8]["n"] == 1


def test_ranks_do_not_depend_on_batching_and_match_a_manual_ranking(model_b, shift_inputs) -> None:
    prompts, conts = shift_inputs
    one = token_distribution_shift(model_b, prompts, conts, batch_size=1, progress=False)
    many = token_distribution_shift(model_b, prompts, conts, batch_size=4, progress=False)
    assert one.ranks == many.ranks
    # Manual: rank of each continuation token in the sorted base logits of its own unpadded forward pass.
    p, c = prompts[1], conts[1]
    seq = torch.tensor([p + c])
    with torch.no_grad():
        logits = model_b(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[0]
    manual = []
    for j, tok in enumerate(c):
        order = logits[len(p) - 1 + j].argsort(descending=True).tolist()
        manual.append(order.index(tok) + 1)
    assert many.ranks[1] == manual


class _PixelModel(torch.nn.Module):
    """A causal LM that takes `pixel_values` (like mmtune's MLLM) and lets them move the logits."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, pixel_values=None):
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask).logits
        if pixel_values is None:
            return SimpleNamespace(logits=logits)
        assert pixel_values.shape[0] == input_ids.shape[0]
        bias = pixel_values.flatten(1)[:, : logits.shape[-1]]
        return SimpleNamespace(logits=logits + 5.0 * bias[:, None, :])


def test_extra_inputs_are_sliced_per_sequence(model_a, shift_inputs) -> None:
    prompts, conts = shift_inputs
    wrapped = _PixelModel(model_a)
    torch.manual_seed(3)
    pixels = torch.randn(len(prompts), 1, 300)
    one = token_distribution_shift(wrapped, prompts, conts, extra_inputs={"pixel_values": pixels}, batch_size=1, progress=False)
    many = token_distribution_shift(wrapped, prompts, conts, extra_inputs={"pixel_values": pixels}, batch_size=4, progress=False)
    assert one.ranks == many.ranks
    assert one.counts["unshifted"] < 26  # the images changed the base distribution
    zero = token_distribution_shift(wrapped, prompts, conts, extra_inputs={"pixel_values": torch.zeros(4, 1, 300)}, progress=False)
    assert zero.counts["unshifted"] == 26
    with pytest.raises(AnalysisError, match="pixel_values.*3 rows for 4 sequences"):
        token_distribution_shift(wrapped, prompts, conts, extra_inputs={"pixel_values": pixels[:3]}, progress=False)
    # The per-sequence list form: each sequence's tensors, concatenated per batch.
    per_seq = [{"pixel_values": pixels[i : i + 1]} for i in range(4)]
    listed = token_distribution_shift(wrapped, prompts, conts, extra_inputs=per_seq, batch_size=3, progress=False)
    assert listed.ranks == one.ranks
    none = token_distribution_shift(wrapped, prompts, conts, extra_inputs=[None] * 4, batch_size=3, progress=False)
    assert none.counts["unshifted"] == 26  # no sequence has pixels: the key is left out
    with pytest.raises(AnalysisError, match="3 entries for 4 sequences"):
        token_distribution_shift(wrapped, prompts, conts, extra_inputs=per_seq[:3], progress=False)


def test_shift_skips_and_errors(model_a, shift_inputs) -> None:
    prompts, conts = shift_inputs
    res = token_distribution_shift(model_a, prompts, [conts[0], [], conts[2], conts[3]], progress=False)
    assert res.skips == {"empty continuation": 1} and res.n_sequences == 3
    assert res.ranks[1] == [] and res.ranks[2] == [1] * 4  # ranks stay aligned with the inputs
    with pytest.raises(AnalysisError, match="prompt #0 is empty"):
        token_distribution_shift(model_a, [[]], [[1, 2]], progress=False)
    with pytest.raises(AnalysisError, match="2 prompts but 1 continuations"):
        token_distribution_shift(model_a, prompts[:2], conts[:1], progress=False)

    class Shrinking(torch.nn.Module):  # a model whose logits do not line up with its inputs
        def forward(self, input_ids, attention_mask):
            return SimpleNamespace(logits=torch.zeros(input_ids.shape[0], 1, 10))

    with pytest.raises(AnalysisError, match=r"\.logits of shape"):
        token_distribution_shift(Shrinking(), prompts, conts, progress=False)


def test_plot_is_a_png(model_b, tokenizer, shift_inputs, tmp_path) -> None:
    prompts, conts = shift_inputs
    res = token_distribution_shift(model_b, prompts, conts, tokenizer=tokenizer, progress=False)
    out = plot_token_shift(res, tmp_path / "plots" / "shift.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "plots" / "shift.png.tmp").exists()
    assert res.to_dict()["n_tokens"] == 26


# --------------------------------------------------------------------------- #
# Knowledge consistency
# --------------------------------------------------------------------------- #

QUESTIONS = [
    {"id": "q1", "question": "The capital of France is", "candidates": ["Paris", "London", "Rome", "Berlin"]},
    {"id": "q2", "question": "Two plus two equals", "candidates": ["four", "five", "three"]},
    ("Water boils at", ["100 degrees", "50 degrees", "0 degrees"]),
    {"id": "q4", "question": "Only one candidate", "candidates": ["yes"]},
]


def test_pearson() -> None:
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert pearson([1, 1, 1], [1, 2, 3]) is None and pearson([1], [1]) is None


def test_answer_logprobs_match_a_manual_computation(model_a, tokenizer) -> None:
    p, a = _ids(tokenizer, "Q: colour of sky? A:"), _ids(tokenizer, " blue")
    got = answer_logprobs(model_a, [p, _ids(tokenizer, "x")], [a, _ids(tokenizer, "yz")], batch_size=2, progress=False)
    seq = torch.tensor([p + a])
    with torch.no_grad():
        logp = model_a(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[0].log_softmax(-1)
    manual = sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(a)) / len(a)
    assert got[0] == pytest.approx(manual, abs=1e-5)


def test_knowledge_consistency_of_a_model_with_itself_is_one(model_a, tokenizer) -> None:
    res = knowledge_consistency(model_a, model_a, tokenizer, QUESTIONS, batch_size=4, progress=False)
    assert res.counted == 3 and res.skips == {"fewer than 2 candidates": 1}
    assert res.mean == pytest.approx(1.0, abs=1e-6)
    assert [q["id"] for q in res.per_question] == ["q1", "q2", "2"]


def test_knowledge_consistency_against_another_model_is_below_one(model_a, model_b, tokenizer) -> None:
    res = knowledge_consistency(model_a, model_b, tokenizer, QUESTIONS, progress=False)
    assert res.counted == 3 and -1.0 <= res.mean < 0.99
    # A tuned prompt format is applied to the tuned model only, and changes its scores.
    fmt = knowledge_consistency(model_a, model_a, tokenizer, QUESTIONS[:2], tuned_format=lambda q: f"USER: {q} ASSISTANT:", progress=False)
    assert fmt.per_question[0]["tuned_scores"] != fmt.per_question[0]["base_scores"]
    with pytest.raises(AnalysisError, match="question 'bad'.*candidates"):
        knowledge_consistency(model_a, model_a, tokenizer, [{"id": "bad", "question": "x", "candidates": "ab"}], progress=False)


# --------------------------------------------------------------------------- #
# Pairwise judging with order swap
# --------------------------------------------------------------------------- #

PAIRS = (
    ["q1", "q2", "q3", "q4"],
    ["a long answer", "short", "a much longer answer", "same"],
    ["short", "a long answer", "tiny", "SAME"],
)


def test_position_biased_judge_gives_only_ties() -> None:
    res = pairwise_judge(*PAIRS, judge=lambda q, a1, a2: "1", progress=False)
    assert (res.wins_a, res.wins_b, res.ties, res.inconsistent) == (0, 0, 4, 4)
    assert res.win_rate_a == 0.5


def test_consistent_judge_wins() -> None:
    def longer(q: str, a1: str, a2: str) -> str:
        return "1" if len(a1) > len(a2) else "2" if len(a2) > len(a1) else "tie"

    res = pairwise_judge(*PAIRS, judge=longer, progress=False)
    assert (res.wins_a, res.wins_b, res.ties, res.inconsistent) == (2, 1, 1, 0)
    assert res.win_rate_a == pytest.approx(2.5 / 4)
    assert [it["outcome"] for it in res.per_item] == ["A", "B", "A", "tie"]


def test_judge_errors_and_skips() -> None:
    with pytest.raises(AnalysisError, match="item '0'.*returned 'maybe'"):
        pairwise_judge(["q"], ["a"], ["b"], judge=lambda *_: "maybe", progress=False)
    res = pairwise_judge(["q", "r"], ["a", None], ["b", "c"], judge=lambda *_: "tie", progress=False)
    assert res.counted == 1 and res.skips == {"missing answer": 1}
    with pytest.raises(AnalysisError, match="lengths differ"):
        pairwise_judge(["q"], ["a", "b"], ["c"], judge=lambda *_: "1", progress=False)


class _AlwaysA(torch.nn.Module):
    """A judge LM that always puts its mass on one token: pure position bias."""

    def __init__(self, vocab: int, token: int) -> None:
        super().__init__()
        self.vocab, self.token = vocab, token

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.token] = 10.0
        return SimpleNamespace(logits=logits)


def test_lm_judge_with_position_bias_gives_only_ties(tokenizer) -> None:
    judge = LMJudge(_AlwaysA(len(tokenizer), _ids(tokenizer, "A")[0]), tokenizer)
    assert judge("q", "x", "y") == "1"
    res = pairwise_judge(*PAIRS, judge=judge, progress=False)
    assert (res.wins_a, res.wins_b, res.ties) == (0, 0, 4)


def test_lm_judge_reads_next_token_probabilities(model_a, tokenizer) -> None:
    judge = LMJudge(model_a, tokenizer, labels=("1", "2"))
    p1, p2 = judge.probabilities("Which is a fruit?", "apple", "chair")
    assert p1 + p2 == pytest.approx(1.0)
    ids = torch.tensor([tokenizer(judge.render("Which is a fruit?", "apple", "chair"))["input_ids"]])
    with torch.no_grad():
        probs = model_a(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].softmax(-1)
    one, two = float(probs[_ids(tokenizer, "1")[0]]), float(probs[_ids(tokenizer, "2")[0]])
    assert p1 == pytest.approx(one / (one + two), abs=1e-5)
    assert judge("Which is a fruit?", "apple", "chair") == ("1" if one > two else "2")
    assert LMJudge(model_a, tokenizer, tie_margin=1.0)("q", "a", "b") == "tie"
    with pytest.raises(AnalysisError, match="not a single token"):
        LMJudge(model_a, tokenizer, labels=("AB", "C"))


def test_bfloat16_models_are_scored_in_float32(model_a, tokenizer) -> None:
    import copy

    half = copy.deepcopy(model_a).to(torch.bfloat16)
    p, a = [_ids(tokenizer, "Q: sky? A:")], [_ids(tokenizer, " blue")]
    got = answer_logprobs(half, p, a, progress=False)[0]
    ref = answer_logprobs(model_a, p, a, progress=False)[0]
    assert got == pytest.approx(ref, abs=0.1) and isinstance(got, float)


def test_knowledge_consistency_passes_per_question_extra_inputs(model_a, tokenizer) -> None:
    wrapped = _PixelModel(model_a)
    torch.manual_seed(4)
    pixels = torch.randn(len(QUESTIONS), 1, 300)
    same = knowledge_consistency(wrapped, wrapped, tokenizer, QUESTIONS, base_extra_inputs={"pixel_values": pixels},
                                 tuned_extra_inputs=[{"pixel_values": pixels[i : i + 1]} for i in range(4)],
                                 batch_size=3, progress=False)
    assert same.mean == pytest.approx(1.0, abs=1e-6)  # the mapping and list forms feed the same pixels
    plain = knowledge_consistency(wrapped, model_a, tokenizer, QUESTIONS, base_extra_inputs={"pixel_values": pixels},
                                  progress=False)
    assert plain.per_question[0]["base_scores"] != plain.per_question[0]["tuned_scores"]
