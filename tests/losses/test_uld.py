"""ULD and hybrid ULD against the reference ``trl.experimental.gold.gold_trainer.ULDLoss``,
and the chunked entry point against the plain full-logits loss (values and gradients)."""

import os
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from axolotl_gold.crosstok.alignment import align_completion, completion_byte_offsets
from axolotl_gold.losses.uld import (
    ULDConfig,
    build_group_index,
    build_vocab_mapping,
    completion_rows,
    generalized_jsd_rows,
    merge_groups,
    sorted_l1_rows,
    uld_loss_from_logits,
)
from axolotl_gold.losses.uld_fused import uld_loss_sum

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tokenizer_factory as tf  # noqa: E402

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
DTYPE = torch.float64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny tensors: thread start-up dominates on a shared CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ULDLoss():
    from trl.experimental.gold.gold_trainer import ULDLoss

    return ULDLoss


def reference_config(**overrides):
    """The GOLDConfig fields ``ULDLoss.__init__`` reads."""
    fields = dict(
        uld_crossentropy_weight=0.0,
        uld_distillation_weight=1.0,
        uld_student_temperature=1.0,
        uld_teacher_temperature=1.0,
        uld_skip_student_eos=False,
        uld_skip_teacher_eos=False,
        use_extended_uld=True,
        uld_token_merge_strategy="bayesian",
        uld_use_hybrid_loss=False,
        uld_hybrid_matched_weight=None,
        uld_hybrid_unmatched_weight=None,
        beta=0.5,
    )
    fields.update(overrides)
    return SimpleNamespace(**fields)


def our_config(ref: SimpleNamespace, **extra) -> ULDConfig:
    return ULDConfig(
        student_temperature=ref.uld_student_temperature,
        teacher_temperature=ref.uld_teacher_temperature,
        merge=ref.uld_token_merge_strategy,
        distillation_weight=ref.uld_distillation_weight,
        crossentropy_weight=ref.uld_crossentropy_weight,
        hybrid_matched_weight=ref.uld_hybrid_matched_weight,
        hybrid_unmatched_weight=ref.uld_hybrid_unmatched_weight,
        hybrid_beta=ref.beta,
        **extra,
    )


def random_offsets(rng, n_bytes, eos):
    cuts = sorted(rng.sample(range(1, n_bytes), rng.randint(n_bytes // 4, n_bytes - 1)))
    bounds = [0, *cuts, n_bytes]
    offsets = list(zip(bounds, bounds[1:], strict=False))
    return offsets + [(n_bytes, n_bytes)] if eos else offsets


class Side:
    """One model's view of one sequence: prompt + completion, hidden states and lm_head."""

    def __init__(self, gen, rng, offsets, prompt_len, hidden, vocab, id_limit=None, weight=None):
        self.offsets, self.prompt_len = offsets, prompt_len
        self.length = len(offsets)
        seq = prompt_len + self.length
        self.ids = torch.randint(0, id_limit or vocab, (seq,), generator=gen)
        self.hidden = torch.randn(seq, hidden, generator=gen, dtype=DTYPE).requires_grad_()
        self.weight = weight if weight is not None else (
            torch.randn(vocab, hidden, generator=gen, dtype=DTYPE) * 1.5
        ).requires_grad_()

    @property
    def completion_ids(self):
        return self.ids[self.prompt_len :].tolist()

    def logits(self):
        return self.hidden @ self.weight.T

    def labels(self):
        labels = self.ids.clone()
        labels[: self.prompt_len] = -100
        return labels

    def byte_offsets(self):
        return torch.tensor([(0, 0)] * self.prompt_len + list(self.offsets), dtype=torch.long)

    def rows(self, merge, tensor=None):
        return completion_rows(self.hidden if tensor is None else tensor, self.prompt_len, self.length, merge)


def make_pair(seed, vs=37, vt=53, hidden=8, n_bytes=None, s_eos=False, t_eos=False, s_tok=None, t_tok=None):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    n_bytes = n_bytes or rng.randint(4, 24)
    s = Side(gen, rng, random_offsets(rng, n_bytes, s_eos), rng.randint(1, 4), hidden, vs,
             id_limit=len(s_tok) if s_tok else None)
    t = Side(gen, rng, random_offsets(rng, n_bytes, t_eos), rng.randint(1, 4), hidden + 3, vt,
             id_limit=len(t_tok) if t_tok else None)
    return s, t


def reference_loss(ULDLoss, ref_cfg, s, t, s_tok=None, t_tok=None):
    loss_fn = ULDLoss(ref_cfg, student_tokenizer=s_tok, teacher_tokenizer=t_tok)
    return loss_fn(
        student_logits=s.logits()[None],
        teacher_logits=t.logits()[None],
        student_labels=s.labels()[None],
        teacher_labels=t.labels()[None],
        student_input_ids=s.ids[None],
        teacher_input_ids=t.ids[None],
        student_byte_offsets=s.byte_offsets()[None],
        teacher_byte_offsets=t.byte_offsets()[None],
    )


def our_loss(cfg, ref_cfg, s, t, mapping=None, chunked=True):
    """Our loss for one sequence, normalized as the reference does (per-sample mean)."""
    s_groups, t_groups = align_completion(
        s.offsets, t.offsets, skip_student_eos=ref_cfg.uld_skip_student_eos,
        skip_teacher_eos=ref_cfg.uld_skip_teacher_eos,
    )
    if chunked:
        total, positions = uld_loss_sum(
            s.rows(cfg.merge), s.weight, t.rows(cfg.merge), t.weight,
            s.completion_ids, t.completion_ids, s_groups, t_groups, cfg, mapping,
        )
    else:
        s_index = build_group_index([s_groups], [s.completion_ids], [0], cfg.merge)
        t_index = build_group_index([t_groups], [t.completion_ids], [0], cfg.merge)
        total, positions = uld_loss_from_logits(
            s.rows(cfg.merge, s.logits()), t.rows(cfg.merge, t.logits()), s_index, t_index, cfg, mapping
        )
    return total, positions


def grads(*tensors):
    return [x.grad.clone() for x in tensors]


def zero_grads(*tensors):
    for x in tensors:
        x.grad = None


# --------------------------------------------------------------------------------------------
# Against the reference


@pytest.mark.parametrize("merge", ["bayesian", "observed"])
@pytest.mark.parametrize(
    "temps,skip", [((1.0, 1.0), (False, False)), ((0.7, 2.0), (True, True)), ((1.3, 1.0), (False, True))]
)
def test_matches_reference_on_random_inputs(ULDLoss, merge, temps, skip):
    for seed in range(6):
        ref_cfg = reference_config(
            uld_token_merge_strategy=merge, uld_student_temperature=temps[0], uld_teacher_temperature=temps[1],
            uld_skip_student_eos=skip[0], uld_skip_teacher_eos=skip[1], uld_distillation_weight=0.8,
        )
        s, t = make_pair(seed, s_eos=skip[0], t_eos=skip[1])
        expected = reference_loss(ULDLoss, ref_cfg, s, t)
        expected.backward()
        ref_grads = grads(s.hidden, s.weight)
        zero_grads(s.hidden, s.weight)

        cfg = our_config(ref_cfg, chunk_size=2)
        total, positions = our_loss(cfg, ref_cfg, s, t)
        (total / positions).backward()
        torch.testing.assert_close(total / positions, expected.reshape(()), rtol=1e-9, atol=1e-12)
        for ours, ref in zip(grads(s.hidden, s.weight), ref_grads, strict=True):
            torch.testing.assert_close(ours, ref, rtol=1e-7, atol=1e-10)
        plain, _ = our_loss(cfg, ref_cfg, s, t, chunked=False)
        torch.testing.assert_close(plain, total.detach(), rtol=1e-10, atol=1e-12)


def test_crossentropy_term_matches_reference(ULDLoss):
    for seed in range(4):
        s, t = make_pair(seed)
        ref_cfg = reference_config(uld_crossentropy_weight=1.0, uld_distillation_weight=0.0)
        expected = reference_loss(ULDLoss, ref_cfg, s, t)  # mean NLL over the completion tokens
        total, _ = our_loss(our_config(ref_cfg), ref_cfg, s, t)
        torch.testing.assert_close(total / s.length, expected.reshape(()), rtol=1e-9, atol=1e-12)


def test_batch_is_sum_of_rows_and_reference_is_mean_of_row_means(ULDLoss):
    """The reference averages per-sample means (each sample weighs the same whatever its length);
    ours returns the plain sum and the position count."""
    ref_cfg = reference_config()
    cfg = our_config(ref_cfg, chunk_size=4)
    pairs = [make_pair(seed) for seed in (11, 12, 13)]
    sums, counts = [], []
    for s, t in pairs:
        total, positions = our_loss(cfg, ref_cfg, s, t)
        sums.append(total.detach())
        counts.append(positions)

    def padded(sides, fn, fill):
        rows = [fn(side) for side in sides]
        width = max(r.size(0) for r in rows)
        return torch.stack([F.pad(r, (0, 0) * (r.dim() - 1) + (0, width - r.size(0)), value=fill) for r in rows])

    students, teachers = [p[0] for p in pairs], [p[1] for p in pairs]
    with torch.no_grad():
        expected = ULDLoss(ref_cfg)(
            student_logits=padded(students, Side.logits, 0.0),
            teacher_logits=padded(teachers, Side.logits, 0.0),
            student_labels=padded(students, Side.labels, -100),
            teacher_labels=padded(teachers, Side.labels, -100),
            student_input_ids=padded(students, lambda x: x.ids, 0),
            teacher_input_ids=padded(teachers, lambda x: x.ids, 0),
            student_byte_offsets=padded(students, Side.byte_offsets, 0),
            teacher_byte_offsets=padded(teachers, Side.byte_offsets, 0),
        )
    row_means = torch.stack([x / n for x, n in zip(sums, counts, strict=True)])
    torch.testing.assert_close(row_means.mean(), expected.reshape(()), rtol=1e-9, atol=1e-12)

    # One call over the batch (list form) is the sum over rows.
    groups = [align_completion(s.offsets, t.offsets) for s, t in pairs]
    with torch.no_grad():
        total, positions = uld_loss_sum(
            [s.rows("bayesian") for s in students], students[0].weight,
            [t.rows("bayesian") for t in teachers], teachers[0].weight,
            [s.completion_ids for s in students], [t.completion_ids for t in teachers],
            [g[0] for g in groups], [g[1] for g in groups], ULDConfig(chunk_size=5),
        )
    # Rows share the first pair's lm_heads here, so recompute the per-row sums with them.
    expected_sum = 0.0
    for (s, t), (sg, tg) in zip(pairs, groups, strict=True):
        with torch.no_grad():
            value, _ = uld_loss_sum(
                s.rows("bayesian"), students[0].weight, t.rows("bayesian"), teachers[0].weight,
                s.completion_ids, t.completion_ids, sg, tg, ULDConfig(),
            )
        expected_sum = expected_sum + value
    torch.testing.assert_close(total, expected_sum)
    assert positions == sum(counts)


@pytest.fixture(scope="module")
def hybrid_tokenizers():
    return tf.byte_level_bpe(400), tf.byte_level_bpe(700, add_prefix_space=True)


@pytest.mark.parametrize(
    "weights,beta", [((None, None), 0.5), ((0.7, 0.3), 0.5), ((None, None), 0.0), ((1.0, 2.0), 1.0)]
)
@pytest.mark.parametrize("merge", ["bayesian", "observed"])
def test_hybrid_matches_reference(ULDLoss, hybrid_tokenizers, weights, beta, merge):
    s_tok, t_tok = hybrid_tokenizers
    mapping = build_vocab_mapping(s_tok, t_tok)
    assert 0 < len(mapping) < len(t_tok)
    for seed in range(3):
        # Logit dimensions larger than the tokenizers (padded embeddings), as in real models.
        s, t = make_pair(seed, vs=len(s_tok) + 3, vt=len(t_tok) + 7, s_tok=s_tok, t_tok=t_tok)
        ref_cfg = reference_config(
            uld_use_hybrid_loss=True, uld_hybrid_matched_weight=weights[0], uld_hybrid_unmatched_weight=weights[1],
            beta=beta, uld_token_merge_strategy=merge, uld_student_temperature=0.9,
        )
        expected = reference_loss(ULDLoss, ref_cfg, s, t, s_tok, t_tok)
        expected.backward()
        ref_grads = grads(s.hidden, s.weight)
        zero_grads(s.hidden, s.weight)

        cfg = our_config(ref_cfg, chunk_size=3)
        s_groups, t_groups = align_completion(s.offsets, t.offsets)
        total, positions = uld_loss_sum(
            s.rows(merge), s.weight, t.rows(merge), t.weight, s.completion_ids, t.completion_ids,
            s_groups, t_groups, cfg, mapping,
        )
        (total / positions).backward()
        torch.testing.assert_close(total / positions, expected.reshape(()), rtol=1e-9, atol=1e-12)
        for ours, ref in zip(grads(s.hidden, s.weight), ref_grads, strict=True):
            torch.testing.assert_close(ours, ref, rtol=1e-7, atol=1e-10)


def test_vocab_mapping_matches_reference(ULDLoss, hybrid_tokenizers):
    s_tok, t_tok = hybrid_tokenizers
    ref = ULDLoss(reference_config(uld_use_hybrid_loss=True), student_tokenizer=s_tok, teacher_tokenizer=t_tok)
    mapping = build_vocab_mapping(s_tok, t_tok)
    assert mapping.teacher_ids.tolist() == sorted(ref._teacher_matched_ids)
    assert mapping.student_ids.tolist() == ref.mapping_tensor[mapping.teacher_ids].tolist()


# --------------------------------------------------------------------------------------------
# The shift of the reference's default merge


def test_observed_merge_never_scores_the_first_completion_token(ULDLoss):
    """Student and teacher agree everywhere except on the distribution that predicts the first
    completion token. "observed" (the reference default) pairs each token with the state at its
    own position, so it sees no difference; "bayesian" does."""
    gen = torch.Generator().manual_seed(0)
    vocab, prompt_len = 6, 2
    ids = torch.tensor([1, 2, 3, 4, 5])  # 2 prompt tokens, 3 completion tokens
    offsets = [(0, 1), (1, 2), (2, 3)]
    s = SimpleNamespace(ids=ids, prompt_len=prompt_len, offsets=offsets, length=3)
    s.logits_ = torch.randn(5, vocab, generator=gen, dtype=DTYPE)
    t_logits = s.logits_.clone()
    t_logits[prompt_len - 1] = torch.tensor([9.0, 0, 0, 0, 0, 0])  # teacher: sure of token 0 first
    s.logits, s.labels, s.byte_offsets = (lambda: s.logits_), (lambda: Side.labels(s)), (lambda: Side.byte_offsets(s))
    t = SimpleNamespace(**vars(s))
    t.logits_ = t_logits
    t.logits = lambda: t.logits_

    results = {}
    for merge in ("observed", "bayesian"):
        ref_cfg = reference_config(uld_token_merge_strategy=merge)
        ref = reference_loss(ULDLoss, ref_cfg, s, t).item()
        groups = align_completion(offsets, offsets)
        s_index = build_group_index([groups[0]], [ids[2:].tolist()], [0], merge)
        ours, positions = uld_loss_from_logits(
            completion_rows(s.logits_, prompt_len, 3, merge), completion_rows(t.logits_, prompt_len, 3, merge),
            s_index, s_index, ULDConfig(merge=merge),
        )
        assert ours.item() / positions == pytest.approx(ref, abs=1e-12)
        results[merge] = ref
    assert results["observed"] == pytest.approx(0.0, abs=1e-12)
    assert results["bayesian"] > 0.1
    with pytest.raises(ValueError):
        completion_rows(s.logits_, 0, 3, "bayesian")


# --------------------------------------------------------------------------------------------
# Building blocks


def test_bayesian_merge_is_the_chain_rule():
    logp = torch.log_softmax(torch.randn(3, 5, dtype=DTYPE), dim=-1)
    ids = [2, 4, 1]
    merged = merge_groups(logp, ids, [[0, 1], [2]], "bayesian")
    # P(token0 = 2, token1 = x) = p0[2] * p1[x]; then the single token.
    torch.testing.assert_close(merged[0], logp[1] + logp[0, 2])
    torch.testing.assert_close(merged[1], logp[2])
    observed = merge_groups(logp, ids, [[0, 1], [2]], "observed")
    torch.testing.assert_close(observed[0], logp[0] + logp[1, 4])


def test_sorted_l1_matches_explicit_padding_values_and_grads():
    a = torch.rand(4, 7, dtype=DTYPE, requires_grad=True)
    b = torch.rand(4, 11, dtype=DTYPE, requires_grad=True)
    weights = torch.rand(4, dtype=DTYPE)
    pa = F.pad(a.sort(-1, descending=True).values, (0, 4))
    explicit = (pa - b.sort(-1, descending=True).values).abs().sum(-1)
    expected = torch.autograd.grad((explicit * weights).sum(), (a, b))
    for ours, flipped in ((sorted_l1_rows(a, b), False), (sorted_l1_rows(b, a), True)):
        torch.testing.assert_close(ours, explicit)
        grads_ = torch.autograd.grad((ours * weights).sum(), (a, b))
        for got, want in zip(grads_, expected, strict=True):
            torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(sorted_l1_rows, (a, b))


def test_generalized_jsd_endpoints():
    s = torch.log_softmax(torch.randn(3, 6, dtype=DTYPE), -1)
    t = torch.log_softmax(torch.randn(3, 6, dtype=DTYPE), -1)
    kl = lambda p, q: (p.exp() * (p - q)).sum(-1)  # noqa: E731
    torch.testing.assert_close(generalized_jsd_rows(s, t, 0.0), kl(t, s))
    torch.testing.assert_close(generalized_jsd_rows(s, t, 1.0), kl(s, t))
    assert (generalized_jsd_rows(s, t, 0.5) > 0).all()
    torch.testing.assert_close(generalized_jsd_rows(s, s, 0.5), torch.zeros(3, dtype=DTYPE))


# --------------------------------------------------------------------------------------------
# Chunked vs plain


def _batch(seed, batch, dtype, hidden=8, vs=41, vt=29):
    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    rows = []
    for _ in range(batch):
        n_bytes = rng.randint(3, 30)
        s_off, t_off = random_offsets(rng, n_bytes, False), random_offsets(rng, n_bytes, True)
        rows.append((s_off, t_off, *align_completion(s_off, t_off, skip_teacher_eos=rng.random() < 0.5)))
    s_len, t_len = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    data = dict(
        s_hidden=torch.randn(batch, s_len, hidden, generator=gen, dtype=dtype).requires_grad_(),
        t_hidden=torch.randn(batch, t_len, hidden + 2, generator=gen, dtype=dtype),
        s_weight=(torch.randn(vs, hidden, generator=gen, dtype=dtype) * 2).requires_grad_(),
        t_weight=torch.randn(vt, hidden + 2, generator=gen, dtype=dtype) * 2,
        s_ids=torch.randint(0, vs, (batch, s_len), generator=gen),
        t_ids=torch.randint(0, vt, (batch, t_len), generator=gen),
        s_groups=[r[2] for r in rows],
        t_groups=[r[3] for r in rows],
        s_lengths=[len(r[0]) for r in rows],
        t_lengths=[len(r[1]) for r in rows],
    )
    return data


def _plain(d, cfg, mapping=None):
    batch, s_len, _ = d["s_hidden"].shape
    t_len = d["t_hidden"].shape[1]
    s_logits = d["s_hidden"].reshape(batch * s_len, -1) @ d["s_weight"].T
    t_logits = d["t_hidden"].reshape(batch * t_len, -1) @ d["t_weight"].T
    s_index = build_group_index(d["s_groups"], d["s_ids"].tolist(), [r * s_len for r in range(batch)], cfg.merge)
    t_index = build_group_index(d["t_groups"], d["t_ids"].tolist(), [r * t_len for r in range(batch)], cfg.merge)
    return uld_loss_from_logits(s_logits, t_logits, s_index, t_index, cfg, mapping)


CHUNK_CONFIGS = [
    ULDConfig(chunk_size=3),
    ULDConfig(chunk_size=1, student_temperature=0.5, teacher_temperature=2.0, crossentropy_weight=0.3),
    ULDConfig(chunk_size=4, merge="observed", distillation_weight=2.0),
    ULDConfig(chunk_size=2, hybrid_beta=0.3, crossentropy_weight=0.1),  # hybrid below
    ULDConfig(chunk_size=7, hybrid_matched_weight=0.25, hybrid_unmatched_weight=0.75, hybrid_beta=1.0),
]


@pytest.mark.parametrize("cfg_id", range(len(CHUNK_CONFIGS)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_matches_plain_values_and_grads(cfg_id, dtype):
    cfg = CHUNK_CONFIGS[cfg_id]
    d = _batch(cfg_id, batch=3, dtype=dtype)
    mapping = None
    if cfg_id >= 3:
        from axolotl_gold.losses.uld import VocabMapping

        mapping = VocabMapping(student_ids=torch.tensor([0, 5, 9, 17, 40]), teacher_ids=torch.tensor([1, 2, 3, 20, 28]))

    expected, expected_n = _plain(d, cfg, mapping)
    expected.backward()
    ref_grads = grads(d["s_hidden"], d["s_weight"])
    zero_grads(d["s_hidden"], d["s_weight"])

    total, positions = uld_loss_sum(
        d["s_hidden"], d["s_weight"], d["t_hidden"], d["t_weight"],
        d["s_ids"], d["t_ids"], d["s_groups"], d["t_groups"], cfg, mapping,
    )
    (total * 1.7).backward()
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-5)
    assert positions == expected_n == sum(len(g) for g in d["s_groups"])
    torch.testing.assert_close(total, expected.detach(), **tol)
    for ours, ref in zip(grads(d["s_hidden"], d["s_weight"]), ref_grads, strict=True):
        torch.testing.assert_close(ours, ref * 1.7, **tol)

    # List-of-rows input (each row cut to its length) gives the same loss and hidden grads.
    s_rows = [d["s_hidden"][r, : d["s_lengths"][r]] for r in range(3)]
    t_rows = [d["t_hidden"][r, : d["t_lengths"][r]] for r in range(3)]
    zero_grads(d["s_hidden"], d["s_weight"])
    total_list, _ = uld_loss_sum(
        s_rows, d["s_weight"], t_rows, d["t_weight"],
        [d["s_ids"][r, : d["s_lengths"][r]].tolist() for r in range(3)],
        [d["t_ids"][r, : d["t_lengths"][r]].tolist() for r in range(3)],
        d["s_groups"], d["t_groups"], cfg, mapping,
    )
    (total_list * 1.7).backward()
    torch.testing.assert_close(total_list, total.detach(), **tol)
    torch.testing.assert_close(d["s_hidden"].grad, ref_grads[0] * 1.7, **tol)


def test_unit_upstream_gradient_and_retained_graph():
    d = _batch(7, batch=2, dtype=torch.float64)
    cfg = ULDConfig(chunk_size=3)
    expected, _ = _plain(d, cfg)
    expected.backward()
    ref_grads = grads(d["s_hidden"], d["s_weight"])
    zero_grads(d["s_hidden"], d["s_weight"])
    total, _ = uld_loss_sum(
        d["s_hidden"], d["s_weight"], d["t_hidden"], d["t_weight"], d["s_ids"], d["t_ids"], d["s_groups"],
        d["t_groups"], cfg,
    )
    total.backward(retain_graph=True)
    for ours, ref in zip(grads(d["s_hidden"], d["s_weight"]), ref_grads, strict=True):
        torch.testing.assert_close(ours, ref)
    (total * 0.5).backward()  # accumulates: 1.5x, the stored gradients were not scaled in place
    for ours, ref in zip(grads(d["s_hidden"], d["s_weight"]), ref_grads, strict=True):
        torch.testing.assert_close(ours, ref * 1.5)


def test_frozen_lm_head_and_default_chunking():
    d = _batch(5, batch=2, dtype=torch.float32)
    weight = d["s_weight"].detach()
    total, _ = uld_loss_sum(
        d["s_hidden"], weight, d["t_hidden"], d["t_weight"], d["s_ids"], d["t_ids"], d["s_groups"], d["t_groups"]
    )
    total.backward()
    assert d["s_hidden"].grad is not None and weight.grad is None


def test_config_and_input_errors():
    with pytest.raises(ValueError):
        ULDConfig(hybrid_matched_weight=0.5)
    with pytest.raises(ValueError):
        ULDConfig(merge="observed", crossentropy_weight=1.0)
    with pytest.raises(ValueError):
        ULDConfig(student_temperature=0)
    d = _batch(1, batch=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="empty"):
        uld_loss_sum(d["s_hidden"], d["s_weight"], d["t_hidden"], d["t_weight"], d["s_ids"], d["t_ids"],
                     [[[0], []]], [[[0], [1]]])


def test_real_tokenizer_pair_end_to_end(ULDLoss, hybrid_tokenizers):
    """Completion text -> byte offsets -> groups -> loss, equal to the reference on the same ids."""
    s_tok, t_tok = tf.unigram_metaspace(True), tf.byte_level_bpe(400)
    text = "Café 😀 東京 龘!"
    s_ids, s_off = completion_byte_offsets(s_tok, text)
    t_ids, t_off = completion_byte_offsets(t_tok, text)
    gen = torch.Generator().manual_seed(3)
    rng = random.Random(3)
    s = Side(gen, rng, s_off, 2, 8, len(s_tok))
    t = Side(gen, rng, t_off, 3, 6, len(t_tok))
    s.ids[2:], t.ids[3:] = torch.tensor(s_ids), torch.tensor(t_ids)
    ref_cfg = reference_config()
    expected = reference_loss(ULDLoss, ref_cfg, s, t)
    total, positions = our_loss(our_config(ref_cfg, chunk_size=4), ref_cfg, s, t)
    assert positions < len(s_ids) and positions < len(t_ids)  # multi-token groups exist
    torch.testing.assert_close(total / positions, expected.reshape(()), rtol=1e-9, atol=1e-12)


def test_hidden_states_in_another_dtype_than_the_head():
    # a LoRA student can hand float32 hidden states (float32 final norm) to a bfloat16
    # head; the loss computes in the head's dtype, as the model's own head would
    d = _batch(2, batch=2, dtype=torch.float32)
    cfg = ULDConfig(chunk_size=4)
    s_weight, t_weight = d["s_weight"].detach().bfloat16(), d["t_weight"].detach().bfloat16()
    args = (d["s_ids"], d["t_ids"], d["s_groups"], d["t_groups"], cfg)
    s_hidden = d["s_hidden"].detach().clone().requires_grad_(True)
    mixed, _ = uld_loss_sum(s_hidden, s_weight.requires_grad_(True), d["t_hidden"], t_weight, *args)
    mixed.backward()
    assert s_hidden.grad.dtype == torch.float32 and s_weight.grad.dtype == torch.bfloat16
    same_hidden = d["s_hidden"].detach().bfloat16().requires_grad_(True)
    same, _ = uld_loss_sum(same_hidden, s_weight.detach(), d["t_hidden"].bfloat16(), t_weight, *args)
    same.backward()
    torch.testing.assert_close(mixed.detach(), same.detach().to(mixed.dtype))
    torch.testing.assert_close(s_hidden.grad, same_hidden.grad.float())


def test_float32_master_head_computed_in_bf16():
    """A float32 head under bf16 autocast (Axolotl's full fine-tune): ``compute_dtype`` bf16
    computes what a bf16 copy of the head computes, and the gradient comes back in float32
    from the float32 accumulator (not through a bf16 copy and a float32 cast of it)."""
    d = _batch(4, batch=2, dtype=torch.float32)
    cfg = ULDConfig(chunk_size=3)
    args = (d["s_ids"], d["t_ids"], d["s_groups"], d["t_groups"], cfg)
    t_hidden, t_weight = d["t_hidden"].bfloat16(), d["t_weight"].detach().bfloat16()
    results = []
    for compute_dtype in (torch.bfloat16, None):
        master = d["s_weight"].detach().clone().requires_grad_(True)
        weight = master if compute_dtype is not None else master.to(torch.bfloat16)
        total, _ = uld_loss_sum(d["s_hidden"].detach(), weight, t_hidden, t_weight, *args, compute_dtype=compute_dtype)
        total.backward()
        results.append((total.detach(), master.grad))
    (ours, ours_grad), (cast, cast_grad) = results
    assert ours_grad.dtype == torch.float32
    torch.testing.assert_close(ours, cast)
    assert float((ours_grad - cast_grad).norm() / cast_grad.norm()) < 5e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="waits on a device need one")
@pytest.mark.parametrize("hybrid", [False, True])
def test_the_chunked_loss_queues_without_waiting_for_the_device(hybrid):
    """The host's group indexes and the vocabulary mapping's unmatched ids are copied to the
    device once a call, without a wait (``queued_copy``), and backward scales without reading
    its upstream gradient: a long kernel queued before the loss is still running when forward
    and backward have been queued."""
    from axolotl_gold.losses.uld import VocabMapping

    d = _batch(3, batch=3, dtype=torch.float32)
    cuda = {k: (v.detach().cuda().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
            for k, v in d.items()}
    mapping = (VocabMapping(student_ids=torch.tensor([0, 5, 9, 17, 40]), teacher_ids=torch.tensor([1, 2, 3, 20, 28]))
               if hybrid else None)
    cfg = ULDConfig(chunk_size=2, hybrid_beta=0.3, crossentropy_weight=0.1)
    args = (cuda["s_hidden"], cuda["s_weight"], cuda["t_hidden"], cuda["t_weight"],
            d["s_ids"].tolist(), d["t_ids"].tolist(), d["s_groups"], d["t_groups"], cfg, mapping)
    # warm with the very ops measured below: CUDA loads a kernel's module at its first launch
    # (lazy loading), and loading waits for the device (the division by 7 was new once: the
    # first run of this test failed on it alone). Warm behind a busy device too: each
    # page-locked block stays taken until its copy has run, so a call queued behind work needs
    # more of them, and a new page-locked allocation waits for the device. A trainer's pool
    # reaches that size in its first steps; the call after it must not wait.
    (uld_loss_sum(*args)[0] / 7).backward()
    torch.cuda._sleep(int(1e8))
    (uld_loss_sum(*args)[0] / 7).backward()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(3e9))
    done = torch.cuda.Event()
    done.record()
    torch.cuda.set_sync_debug_mode("error")  # a torch op that waits raises here, naming itself
    try:
        total, _ = uld_loss_sum(*args)
        (total / 7).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not done.query(), "the ULD loss waited for the device"
    torch.cuda.synchronize()
    assert torch.isfinite(total)
