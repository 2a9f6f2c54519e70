"""The sampler against transformers' own logits processors, which are the reference for every filter.

Distributions are checked by drawing many tokens with a fixed seed and comparing the counts with the
exact filtered distribution that HF's processors give (chi-square, plus a Chernoff bound per token),
and support is checked exactly: a token HF gives probability 0 must never be drawn.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from dmoe.sampling import (
    Sampler,
    SamplingParams,
    _exp_shifted,
    _top_k_indices,
    apply_repetition_penalty,
    candidates,
)

QWEN3_VOCAB = 151936


def hf_penalised(logits: np.ndarray, history: list[int], penalty: float) -> np.ndarray:
    """HF's RepetitionPenaltyLogitsProcessor on one vector, in float32 as a model would give it."""
    proc = RepetitionPenaltyLogitsProcessor(penalty)
    out = proc(torch.tensor([history], dtype=torch.long), torch.tensor(logits, dtype=torch.float32)[None])
    return out[0].numpy()


def hf_probs(logits: np.ndarray, p: SamplingParams, history: list[int] = ()) -> np.ndarray:
    """The exact distribution HF's generate samples from for these params, in float64: [V]."""
    scores = torch.tensor(logits, dtype=torch.float64)[None]
    procs = LogitsProcessorList()
    if p.repetition_penalty != 1.0 and len(history):
        procs.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    procs.append(TemperatureLogitsWarper(p.temperature))
    if p.top_k:
        procs.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        procs.append(TopPLogitsWarper(p.top_p))
    if p.min_p > 0.0:
        procs.append(MinPLogitsWarper(p.min_p))
    scores = procs(torch.tensor([list(history)], dtype=torch.long), scores)
    return torch.softmax(scores, dim=-1)[0].numpy()


def assert_draws_follow(draws: np.ndarray, probs: np.ndarray) -> None:
    """Draws never leave HF's support, and their counts fit `probs` (chi-square, Chernoff bound per token)."""
    n = draws.size
    counts = np.bincount(draws, minlength=probs.size)
    outside = np.flatnonzero((counts > 0) & (probs == 0))
    assert outside.size == 0, f"drew tokens HF filters out: {outside[:10]}"
    # Per token, Chernoff: P(a count this far from n p) <= 2 exp(-n KL(count/n || p)); fail below 1e-4 / V.
    q = counts / n
    with np.errstate(divide="ignore", invalid="ignore"):
        above = np.where(q > 0, q * np.log(q / probs), 0.0)
        below = np.where(q < 1, (1 - q) * np.log((1 - q) / (1 - probs)), 0.0)
    kl = above + below
    worst = int(np.argmax(kl))
    assert n * kl[worst] < np.log(2e4 * probs.size), (
        f"token {worst}: drawn {counts[worst]} times, expected {n * probs[worst]:.1f}"
    )
    # Chi-square over the tokens expected >= 5 times, the rest pooled into one category.
    big = n * probs >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(n * probs[big], n * probs[~big].sum())
    if exp[-1] < 5:  # too small a pool for chi-square: fold it into the smallest category
        j = np.argmin(exp[:-1])
        obs[j] += obs[-1]
        exp[j] += exp[-1]
        obs, exp = obs[:-1], exp[:-1]
    if obs.size > 1:
        chi2 = float(np.sum((obs - exp) ** 2 / exp))
        pvalue = float(torch.special.gammaincc(torch.tensor((obs.size - 1) / 2), torch.tensor(chi2 / 2)))
        assert pvalue > 1e-4, f"chi-square p = {pvalue:.2e} over {obs.size} categories"


def peaked_logits(rng: np.random.Generator, vocab: int) -> np.ndarray:
    """LM-like logits: a broad low body and a few dozen plausible tokens well above it."""
    x = rng.normal(0.0, 2.0, vocab).astype(np.float32)
    x[rng.choice(vocab, 40, replace=False)] += rng.uniform(3.0, 8.0, 40).astype(np.float32)
    return x


# --- params ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"min_p": -0.01}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"seed": -3}, "seed"),
        ({"seed": "7"}, "seed"),
    ],
)
def test_invalid_params_raise(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_inputs_raise() -> None:
    s = Sampler(SamplingParams(temperature=1.0))
    with pytest.raises(ValueError, match="one \\[vocab\\] vector"):
        s(np.zeros((2, 8), np.float32))
    with pytest.raises(ValueError, match="finite"):
        s(np.full(8, -np.inf, np.float32))
    with pytest.raises(ValueError, match="finite"):
        s(np.array([0.0, np.nan, 1.0], np.float32))
    with pytest.raises(ValueError, match="negative token id"):
        Sampler(SamplingParams(repetition_penalty=1.2))(np.zeros(8, np.float32), [1, -1])


# --- repetition penalty and greedy ------------------------------------------------------------------


def test_repetition_penalty_by_hand_and_hf() -> None:
    logits = np.array([2.0, -1.0, 1.8, 3.0, 0.0], np.float32)
    history = [3, 1, 1, 3]  # each seen token is penalised once, however often it was seen
    by_hand = np.array([2.0, -2.0, 1.8, 1.5, 0.0], np.float32)  # 3.0 / 2, -1.0 * 2
    np.testing.assert_array_equal(hf_penalised(logits, history, 2.0), by_hand)
    np.testing.assert_array_equal(apply_repetition_penalty(logits, history, 2.0), by_hand)
    before = logits.copy()
    assert Sampler(SamplingParams())(logits, history) == 3  # no penalty: plain argmax
    assert Sampler(SamplingParams(repetition_penalty=2.0))(logits, history) == 0
    np.testing.assert_array_equal(logits, before)  # the caller's logits are not written


def test_repetition_penalty_matches_hf_on_random_logits() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, 1000).astype(np.float32)
    history = rng.integers(0, 1000, 300).tolist()  # with repeats
    for penalty in (0.7, 1.3):
        ours = apply_repetition_penalty(logits, np.array(history), penalty)
        np.testing.assert_allclose(ours, hf_penalised(logits, history, penalty), rtol=1e-6)
    # Ids past the vocab are ignored, as HF does for ids past the lm_head.
    np.testing.assert_array_equal(apply_repetition_penalty(logits, [1000, 5000], 1.3), logits)


def test_greedy_is_argmax_at_full_vocab() -> None:
    rng = np.random.default_rng(2)
    greedy = Sampler(SamplingParams(top_k=5, top_p=0.5, min_p=0.5))  # filters do not apply to greedy
    penalised = Sampler(SamplingParams(repetition_penalty=1.5))
    for _ in range(5):
        logits = rng.normal(0, 3, QWEN3_VOCAB).astype(np.float32)
        assert greedy(logits) == int(np.argmax(logits))
        history = np.append(rng.integers(0, QWEN3_VOCAB, 100), np.argsort(logits)[-3:])  # the 3 best seen
        expect = int(np.argmax(hf_penalised(logits, history.tolist(), 1.5)))
        assert penalised(logits, history) == expect


# --- distributions against HF -----------------------------------------------------------------------

# vocab 3000: three blocks of the full-vocab draw; top-k <= 11 takes the column-maxima path
DIST_CASES = [
    pytest.param(SamplingParams(temperature=1.0), id="temperature-only"),
    pytest.param(SamplingParams(temperature=0.7, top_k=8), id="top_k-pruned"),
    pytest.param(SamplingParams(temperature=1.3, top_k=50), id="top_k-argpartition"),
    pytest.param(SamplingParams(temperature=1.0, top_p=0.7), id="top_p"),
    pytest.param(SamplingParams(temperature=1.5, min_p=0.05), id="min_p"),
    pytest.param(SamplingParams(temperature=1.0, top_p=0.9, min_p=0.2), id="top_p+min_p-min_p-tighter"),
    pytest.param(SamplingParams(temperature=0.8, top_p=0.6, min_p=0.01), id="top_p+min_p-top_p-tighter"),
    pytest.param(
        SamplingParams(temperature=0.9, top_k=10, top_p=0.8, min_p=0.1, repetition_penalty=1.3),
        id="all-with-top_k",
    ),
    pytest.param(SamplingParams(temperature=1.2, top_p=0.95, repetition_penalty=1.2), id="top_p+penalty"),
]


@pytest.mark.parametrize("params", DIST_CASES)
def test_draws_follow_hf_distribution(params: SamplingParams) -> None:
    rng = np.random.default_rng(3)
    logits = peaked_logits(rng, 3000)
    history = rng.choice(np.argsort(logits)[-40:], 8).tolist()  # some of the plausible tokens, seen
    probs = hf_probs(logits, params, history)
    sampler = Sampler(replace(params, seed=11))
    draws = np.array([sampler(logits, history) for _ in range(2000)])
    assert_draws_follow(draws, probs)


def test_nucleus_boundary_keeps_the_crossing_token() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05])).astype(np.float32)
    params = SamplingParams(temperature=1.0, top_p=0.75, seed=0)  # 0.5 < 0.75 <= 0.5 + 0.3
    np.testing.assert_allclose(hf_probs(logits, params), [0.625, 0.375, 0, 0], atol=1e-6)
    sampler = Sampler(params)
    draws = np.array([sampler(logits) for _ in range(2000)])
    assert_draws_follow(draws, hf_probs(logits, params))


def test_nucleus_cut_inside_one_weight_bin() -> None:
    # Ten near-equal tokens (0.04% apart, inside one 0.54%-wide weight bin) across the top-p boundary:
    # the vocab-wide path has to order that bin and keep only its first three.
    logits = np.concatenate([[3.0], -0.0004 * np.arange(10), np.full(2000, -30.0)]).astype(np.float32)
    params = SamplingParams(temperature=1.0, top_p=0.75, seed=2)
    probs = hf_probs(logits, params)
    assert np.count_nonzero(probs) == 4
    sampler = Sampler(params)
    assert_draws_follow(np.array([sampler(logits) for _ in range(1000)]), probs)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.6, top_k=20, top_p=0.95),  # Qwen3's generation_config
        SamplingParams(temperature=1.0, top_p=0.9),
        SamplingParams(temperature=1.0, top_p=0.5, min_p=0.02),
        SamplingParams(temperature=1.5, min_p=0.1),
        SamplingParams(temperature=1.0, top_k=700),  # more than the column maxima can prune
    ],
    ids=["qwen3", "top_p", "top_p+min_p", "min_p", "top_k-large"],
)
def test_full_vocab_never_leaves_hf_support(params: SamplingParams) -> None:
    rng = np.random.default_rng(4)
    logits = peaked_logits(rng, QWEN3_VOCAB)
    logits[rng.choice(QWEN3_VOCAB, 1000, replace=False)] = -np.inf  # masked tokens
    probs = hf_probs(logits, params)
    sampler = Sampler(replace(params, seed=5))
    draws = np.array([sampler(logits) for _ in range(200)])
    assert probs[draws].min() > 0, "drew a token HF filters out"
    if params.top_k == 0:
        assert_draws_follow(draws, probs)  # the kept set is small enough for counts to mean something


def test_masked_tokens_are_never_drawn() -> None:
    rng = np.random.default_rng(6)
    logits = rng.normal(0, 1, 5000).astype(np.float32)
    logits[::2] = -np.inf
    for params in (SamplingParams(temperature=3.0), SamplingParams(temperature=3.0, top_k=4000)):
        sampler = Sampler(replace(params, seed=1))
        draws = np.array([sampler(logits) for _ in range(500)])
        assert np.all(draws % 2 == 1)


# --- reproducibility and inputs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.8, top_k=20, top_p=0.9),
        SamplingParams(temperature=1.0, top_p=0.9),
    ],
    ids=["full", "top_k", "top_p"],
)
def test_seed_reproduces_and_different_seeds_differ(params: SamplingParams) -> None:
    logits = peaked_logits(np.random.default_rng(7), 5000)

    def run(seed: int) -> list[int]:
        sampler = Sampler(replace(params, seed=seed))
        return [sampler(logits) for _ in range(200)]

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_caller_logits_untouched_and_other_dtypes_accepted() -> None:
    rng = np.random.default_rng(8)
    logits = rng.normal(0, 3, 4096).astype(np.float32)
    before = logits.copy()
    for params in DIST_CASES:
        Sampler(params.values[0])(logits, [1, 2, 3])
    np.testing.assert_array_equal(logits, before)
    p = SamplingParams(temperature=0.5, top_k=3, seed=0)
    assert Sampler(p)(logits.astype(np.float64)) == Sampler(p)(logits)


# --- private pieces against their plain equivalents -----------------------------------------------------


def test_top_k_indices_are_the_k_largest() -> None:
    rng = np.random.default_rng(9)
    cases = [(100, 3), (1000, 1), (3000, 11), (QWEN3_VOCAB, 20), (QWEN3_VOCAB, 500), (QWEN3_VOCAB, 5000)]
    for vocab, k in cases:
        for x in (rng.normal(0, 3, vocab), rng.integers(-5, 5, vocab)):  # the second with many ties
            x = x.astype(np.float32)
            idx = _top_k_indices(x, k)
            assert idx.size == k and np.unique(idx).size == k
            np.testing.assert_array_equal(np.sort(x[idx]), np.sort(x)[-k:])


def test_fast_exp_matches_exp() -> None:
    t = np.concatenate([np.linspace(-87.2, 0, 200_001), [-1e-30, -100.0, -np.inf]]).astype(np.float32)
    out = np.empty_like(t)
    scales = np.empty(t.size, np.int32)
    _exp_shifted(t, 0.0, 1.0, out, scales, scales.view(np.float32))
    ref = np.exp(t[:-3].astype(np.float64))
    assert np.max(np.abs(out[:-3] - ref) / ref) < 3e-7
    assert out[-3] == 1.0 and out[-2] == 0.0 and out[-1] == 0.0


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.6, top_k=20, top_p=0.95),
                                    SamplingParams(temperature=1.0, top_k=5, min_p=0.1)])
def test_the_top_candidates_decide_the_draw(params: SamplingParams) -> None:
    """sampling.candidates: the draw from only that many largest logits per rank (the rest -inf, as a split
    output matrix sends them) is the draw from the whole row."""
    rng = np.random.default_rng(3)
    k = candidates(params)
    assert k > 0
    for seed in range(20):
        logits = rng.normal(0, 3, 4096).astype(np.float32)
        sparse = np.full_like(logits, -np.inf)
        for part in np.array_split(np.arange(logits.size), 3):  # 3 ranks' rows, each sends its top k
            best = part[np.argsort(logits[part])[-k:]]
            sparse[best] = logits[best]
        pick = SamplingParams(params.temperature, params.top_k, params.top_p, params.min_p, seed=seed)
        assert Sampler(pick)(sparse) == Sampler(pick)(logits)


def test_a_penalty_or_an_open_vocabulary_needs_every_logit() -> None:
    assert candidates(SamplingParams(temperature=0.0, repetition_penalty=1.1)) == 0
    assert candidates(SamplingParams(temperature=1.0, top_p=0.9)) == 0
