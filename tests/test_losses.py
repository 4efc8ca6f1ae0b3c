"""kd_loss and hard_label_loss against independent float64 computations (DESIGN.md section 5).

Every reference here is written out with plain torch in float64 from the formulas in the design,
never through ``softlabels.losses``. Sizes are awkward on purpose (B=3, T=7, V=13, k=6, V=29).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from softlabels.losses import IGNORE_INDEX, hard_label_loss, kd_loss

TAILS = ("bucket", "renorm", "uniform")
TEMPERATURES = (1.0, 2.0, 4.5)


# -- independent references (float64) ------------------------------------------------------------


def hinton(student: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over valid positions, in float64."""
    p = torch.softmax(teacher_logits.double() / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits.double() / temperature, dim=-1)
    log_s = torch.log_softmax(student.double() / temperature, dim=-1)
    per_position = torch.where(p > 0, p * (log_p - log_s), torch.zeros_like(p)).sum(-1)
    return _average(per_position, mask) * temperature**2


def _average(per_position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_position.mean()
    return per_position[mask].sum() / mask.sum()


def bucket_reference(student: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, temperature: float) -> torch.Tensor:
    """The k ids plus one tail bucket, written from the design text; float64, mean over positions, times T^2."""
    vocab, k = student.shape[-1], ids.shape[-1]
    t = logprobs.double().exp()
    tau = (1.0 - t.sum(-1)).clamp(min=0.0)
    q_k = t ** (1.0 / temperature)
    q_tail = (vocab - k) * (tau / (vocab - k)) ** (1.0 / temperature)
    q = torch.cat([q_k, q_tail.unsqueeze(-1)], dim=-1)
    q = q / q.sum(-1, keepdim=True)
    s = torch.softmax(student.double() / temperature, dim=-1)
    s_k = s.gather(-1, ids)
    s_tail = 1.0 - s_k.sum(-1)
    s_full = torch.cat([s_k, s_tail.unsqueeze(-1)], dim=-1)
    kl = torch.where(q > 0, q * (q.log() - s_full.log()), torch.zeros_like(q)).sum(-1)
    return kl.mean() * temperature**2


def renorm_reference(student: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(lp/T) over the k ids || student log-probs over V gathered at the k ids); float64."""
    q = torch.softmax(logprobs.double() / temperature, dim=-1)
    log_s = torch.log_softmax(student.double() / temperature, dim=-1).gather(-1, ids)
    kl = torch.where(q > 0, q * (q.log() - log_s), torch.zeros_like(q)).sum(-1)
    return kl.mean() * temperature**2


def uniform_reference(student: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, temperature: float) -> torch.Tensor:
    """The dense teacher with tau spread evenly over the V-k other ids, then Hinton's loss; float64."""
    vocab, k = student.shape[-1], ids.shape[-1]
    tau = (1.0 - logprobs.double().exp().sum(-1, keepdim=True)).clamp(min=0.0)
    dense = (tau / (vocab - k)).log().expand(*ids.shape[:-1], vocab).clone().scatter(-1, ids, logprobs.double())
    return hinton(student, dense, temperature)


def fp16(x: torch.Tensor) -> torch.Tensor:
    """What a shard stores and the loader returns: float16 and back to float32."""
    return x.to(torch.float16).to(torch.float32)


def full_topk(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, log-probs at T=1 over the full vocabulary) of the k most probable classes, most probable first."""
    logprobs = torch.log_softmax(teacher_logits.double(), dim=-1)
    values, ids = logprobs.topk(k, dim=-1)
    return ids, values.float()


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


# -- k = V: every tail mode is Hinton's dense loss --------------------------------------------------


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("shape", ["BTV-masked", "BTV", "BV"])
@pytest.mark.parametrize("seed", [0, 1])
def test_full_k_equals_dense_hinton_exact_fp32(tail, temperature, shape, seed):
    generator = torch.Generator().manual_seed(seed)
    dims = (3, 7, 13) if shape.startswith("BTV") else (5, 11)
    teacher_logits = torch.randn(dims, generator=generator, dtype=torch.float64) * 3
    student64 = torch.randn(dims, generator=generator, dtype=torch.float64) * 2
    mask = None
    if shape == "BTV-masked":
        mask = torch.rand(dims[:-1], generator=generator) < 0.6
        mask[0, 0] = True
    ids, logprobs = full_topk(teacher_logits, dims[-1])
    # the ids come in teacher order, not 0..V-1, so the gather has to be right
    assert not torch.equal(ids, torch.arange(dims[-1]).expand_as(ids))

    student = leaf(student64)
    loss = kd_loss(student, ids, logprobs, temperature=temperature, tail=tail, mask=mask)
    loss.backward()
    reference_student = leaf(student64)
    reference = hinton(reference_student, teacher_logits, temperature, mask)
    reference.backward()

    assert loss.ndim == 0
    torch.testing.assert_close(loss.double(), reference, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(student.grad, reference_student.grad, rtol=1e-4, atol=1e-6)
    if mask is not None:
        assert torch.all(student.grad[~mask] == 0), "masked positions must not get gradient"


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("masked", [True, False])
def test_full_k_equals_dense_hinton_fp16_logprobs(tail, temperature, masked):
    """As in real shards: log-probs stored in float16. Against the exact teacher within fp16's error,
    and against the dense loss of the dequantised log-probs (which is what they mean) tightly."""
    generator = torch.Generator().manual_seed(11)
    dims = (3, 7, 13)
    teacher_logits = torch.randn(dims, generator=generator, dtype=torch.float64) * 3
    student64 = torch.randn(dims, generator=generator, dtype=torch.float64) * 2
    mask = (torch.rand(dims[:-1], generator=generator) < 0.5) if masked else None
    if mask is not None:
        mask[1, 3] = True
    ids, logprobs = full_topk(teacher_logits, dims[-1])
    stored = fp16(logprobs)
    assert not torch.equal(stored, logprobs)

    loss = kd_loss(student64, ids, stored, temperature=temperature, tail=tail, mask=mask).double()
    # fp16 keeps 11 significant bits: |log-prob error| <= |lp| * 2^-11, and the loss moves by less
    # than the largest change of log q (both teacher terms) times a constant
    exact = hinton(student64, teacher_logits, temperature, mask)
    torch.testing.assert_close(loss, exact, rtol=2e-2, atol=5e-3 * temperature**2)
    # the same stored values as dense teacher logits: softmax(lp/T) over V is exactly the teacher
    dense_of_stored = torch.zeros(dims, dtype=torch.float64).scatter(-1, ids, stored.double())
    torch.testing.assert_close(loss, hinton(student64, dense_of_stored, temperature, mask), rtol=2e-5, atol=2e-6)


# -- k < V -----------------------------------------------------------------------------------------


def uniform_tail_teacher(generator: torch.Generator, batch: tuple[int, ...], vocab: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A teacher whose V-k tail classes really share the tail mass equally.

    Returns (dense probabilities [..., V], top-k ids, top-k log-probs at T=1)."""
    head = torch.rand(*batch, k, generator=generator, dtype=torch.float64) + 0.5
    tau = torch.rand(*batch, 1, generator=generator, dtype=torch.float64) * 0.3 + 0.05
    head = head / head.sum(-1, keepdim=True) * (1 - tau)
    tail_each = tau / (vocab - k)
    assert torch.all(head.min(-1).values > tail_each.squeeze(-1)), "the tail must really be the tail"
    ids = torch.stack([torch.randperm(vocab, generator=generator)[:k] for _ in range(math.prod(batch))]).reshape(*batch, k)
    order = head.argsort(dim=-1, descending=True)
    head, = (head.gather(-1, order),)
    ids = ids.gather(-1, order)
    dense = tail_each.expand(*batch, vocab).clone().scatter(-1, ids, head)
    torch.testing.assert_close(dense.sum(-1), torch.ones(batch, dtype=torch.float64))
    return dense, ids, head.log().float()


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("masked", [True, False])
def test_uniform_equals_dense_when_the_tail_is_uniform(temperature, seed, masked):
    generator = torch.Generator().manual_seed(seed)
    batch, vocab, k = (3, 7), 29, 6
    dense, ids, logprobs = uniform_tail_teacher(generator, batch, vocab, k)
    student64 = torch.randn(*batch, vocab, generator=generator, dtype=torch.float64) * 2
    mask = (torch.rand(batch, generator=generator) < 0.6) if masked else None
    if mask is not None:
        mask[2, 6] = True

    student = leaf(student64)
    loss = kd_loss(student, ids, logprobs, temperature=temperature, tail="uniform", mask=mask)
    loss.backward()
    reference_student = leaf(student64)
    reference = hinton(reference_student, dense.log(), temperature, mask)
    reference.backward()
    torch.testing.assert_close(loss.double(), reference, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(student.grad, reference_student.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("quantised", [False, True], ids=["fp32", "fp16"])
@pytest.mark.parametrize("seed", [0, 5])
def test_bucket_equals_independent_bucketed_kl(temperature, quantised, seed):
    generator = torch.Generator().manual_seed(seed)
    vocab, k = 29, 6
    teacher_logits = torch.randn(4, 5, vocab, generator=generator, dtype=torch.float64) * 2
    student64 = torch.randn(4, 5, vocab, generator=generator, dtype=torch.float64) * 2
    ids, logprobs = full_topk(teacher_logits, k)
    if quantised:
        logprobs = fp16(logprobs)
    tail_mass = 1 - logprobs.double().exp().sum(-1)
    assert tail_mass.min() > 0.02, "the teacher must have a real tail for this test to mean anything"

    student = leaf(student64)
    loss = kd_loss(student, ids, logprobs, temperature=temperature, tail="bucket")
    loss.backward()
    reference_student = leaf(student64)
    reference = bucket_reference(reference_student, ids, logprobs, temperature)
    reference.backward()
    torch.testing.assert_close(loss.double(), reference, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(student.grad, reference_student.grad, rtol=1e-4, atol=1e-6)
    # and it is not the dense loss: the student's tail need not be uniform
    assert not torch.isclose(loss.double(), hinton(student64, teacher_logits, temperature), rtol=1e-3)


def test_bucket_student_tail_is_computed_stably():
    """A student whose tail mass is ~1e-12: 1 - sum(p_k) in float32 is 0 or negative; the loss must
    still match the float64 value (the teacher's tail term log(tau/s_tail) is large and finite)."""
    vocab, k, temperature = 29, 6, 1.0
    generator = torch.Generator().manual_seed(2)
    teacher_logits = torch.randn(2, vocab, generator=generator, dtype=torch.float64)
    ids, logprobs = full_topk(teacher_logits, k)
    student64 = torch.full((2, vocab), -14.0, dtype=torch.float64)
    student64.scatter_(-1, ids, torch.randn(2, k, generator=generator, dtype=torch.float64) + 14.0)
    s_tail = 1 - torch.softmax(student64, -1).gather(-1, ids).sum(-1)
    assert s_tail.max() < 1e-10
    student = leaf(student64)
    loss = kd_loss(student, ids, logprobs, temperature=temperature, tail="bucket")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    torch.testing.assert_close(loss.double(), bucket_reference(student64, ids, logprobs, temperature), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("quantised", [False, True], ids=["fp32", "fp16"])
def test_renorm_equals_kl_over_the_k_ids(temperature, quantised):
    generator = torch.Generator().manual_seed(9)
    vocab, k = 29, 6
    teacher_logits = torch.randn(11, vocab, generator=generator, dtype=torch.float64) * 2
    student64 = torch.randn(11, vocab, generator=generator, dtype=torch.float64) * 2
    ids, logprobs = full_topk(teacher_logits, k)
    if quantised:
        logprobs = fp16(logprobs)
    student = leaf(student64)
    loss = kd_loss(student, ids, logprobs, temperature=temperature, tail="renorm")
    loss.backward()
    reference_student = leaf(student64)
    reference = renorm_reference(reference_student, ids, logprobs, temperature)
    reference.backward()
    torch.testing.assert_close(loss.double(), reference, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(student.grad, reference_student.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tail", TAILS)
def test_masked_positions_do_not_matter(tail):
    """Padding as collate produces it (ids 0, log-probs 0) under a False mask changes nothing."""
    generator = torch.Generator().manual_seed(4)
    vocab, k = 29, 6
    teacher_logits = torch.randn(3, 7, vocab, generator=generator, dtype=torch.float64)
    student = torch.randn(3, 7, vocab, generator=generator)
    ids, logprobs = full_topk(teacher_logits, k)
    mask = torch.rand(3, 7, generator=generator) < 0.5
    mask[0, 0] = True
    padded_ids, padded_lp = ids.masked_fill(~mask[..., None], 0), logprobs.masked_fill(~mask[..., None], 0.0)
    clean = kd_loss(student, ids, logprobs, 2.0, tail, mask)
    x = leaf(student)
    padded = kd_loss(x, padded_ids, padded_lp, 2.0, tail, mask)
    padded.backward()
    torch.testing.assert_close(padded, clean, rtol=0, atol=0)
    assert torch.isfinite(x.grad).all() and torch.all(x.grad[~mask] == 0)
    # only the valid positions, flattened, give the same number
    torch.testing.assert_close(kd_loss(student[mask], ids[mask], logprobs[mask], 2.0, tail), clean, rtol=1e-6, atol=1e-7)


# -- finite gradients at the edges ---------------------------------------------------------------


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("k", [6, 29])
def test_all_masked_batch_is_zero_with_finite_grads(tail, k):
    generator = torch.Generator().manual_seed(1)
    ids, logprobs = full_topk(torch.randn(2, 5, 29, generator=generator), k)
    x = leaf(torch.randn(2, 5, 29, generator=generator))
    loss = kd_loss(x, ids, logprobs, 2.0, tail, mask=torch.zeros(2, 5, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(x.grad).all() and torch.all(x.grad == 0)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("floor", [-65504.0, -1e4], ids=["fp16-floor", "-1e4"])
@pytest.mark.parametrize("k", [6, 29])
def test_logprobs_near_minus_infinity(tail, floor, k):
    """Stored log-probs at the fp16 floor: classes the teacher rules out. Loss and grads stay finite,
    and the value equals the reference where those classes have probability 0."""
    generator = torch.Generator().manual_seed(6)
    vocab = 29
    teacher_logits = torch.randn(3, vocab, generator=generator, dtype=torch.float64)
    ids, logprobs = full_topk(teacher_logits, k)
    logprobs = logprobs.clone()
    logprobs[:, 2:] = floor  # the teacher puts (numerically) nothing on the later ids
    logprobs[:, :2] = torch.log_softmax(logprobs[:, :2].double(), -1).float() - (0.1 if k < vocab else 0.0)
    logprobs = fp16(logprobs)
    x = leaf(torch.randn(3, vocab, generator=generator, dtype=torch.float64))
    loss = kd_loss(x, ids, logprobs, 2.0, tail)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    if k == vocab:
        dense = torch.zeros(3, vocab, dtype=torch.float64).scatter(-1, ids, logprobs.double())
        reference = hinton(x.detach(), dense, 2.0)
    else:
        reference = {"bucket": bucket_reference, "renorm": renorm_reference, "uniform": uniform_reference}[tail]
        reference = reference(x.detach(), ids, logprobs, 2.0)
    torch.testing.assert_close(loss.double(), reference, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("teacher", ["one-hot", "sum-over-1"])
def test_teacher_with_zero_tail_mass_at_k_below_v(tail, teacher):
    """tau = 0 exactly (a one-hot teacher: log-probs 0 and the fp16 floor) or sum(exp(lp)) a hair above
    1 (rounding): no NaN anywhere, and the value is the reference's with an empty tail."""
    generator = torch.Generator().manual_seed(8)
    vocab, k = 29, 6
    if teacher == "one-hot":
        logprobs = torch.full((4, k), -65504.0)
        logprobs[:, 0] = 0.0
    else:
        head = torch.softmax(torch.randn(4, k, generator=generator, dtype=torch.float64), -1)
        logprobs = (head.sort(-1, descending=True).values.log() + 1e-3).float()
    ids = torch.stack([torch.randperm(vocab, generator=generator)[:k] for _ in range(4)])
    x = leaf(torch.randn(4, vocab, generator=generator, dtype=torch.float64))
    loss = kd_loss(x, ids, logprobs, 2.0, tail)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    reference = {"bucket": bucket_reference, "renorm": renorm_reference, "uniform": uniform_reference}[tail]
    torch.testing.assert_close(loss.double(), reference(x.detach(), ids, logprobs, 2.0), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("k", [6, 29])
@pytest.mark.parametrize("temperature", [1.0, 4.5])
def test_extreme_student_logits(tail, k, temperature):
    generator = torch.Generator().manual_seed(10)
    vocab = 29
    ids, logprobs = full_topk(torch.randn(3, vocab, generator=generator), k)
    logprobs = fp16(logprobs)
    signs = torch.where(torch.rand(3, vocab, generator=generator) < 0.5, -1.0, 1.0)
    x = leaf(signs * 1e4)
    loss = kd_loss(x, ids, logprobs, temperature, tail)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    # also the student that is certain of the class the teacher likes least, and the reverse
    for value in (1e4, -1e4):
        y = leaf(torch.zeros(3, vocab).scatter(-1, ids[:, -1:], value))
        kd_loss(y, ids, logprobs, temperature, tail).backward()
        assert torch.isfinite(y.grad).all()


def test_bad_arguments_are_refused():
    x, ids, lp = torch.zeros(2, 5), torch.zeros(2, 6, dtype=torch.long), torch.zeros(2, 6)
    with pytest.raises(ValueError, match="k=6"):
        kd_loss(x, ids, lp)
    with pytest.raises(ValueError, match="tail"):
        kd_loss(x, ids[:, :2], lp[:, :2], tail="dense")
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(x, ids[:, :2], lp[:, :2], temperature=0.0)


# -- hard labels -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 7, 13), (11, 13)])
@pytest.mark.parametrize("seed", [0, 1])
def test_hard_label_loss_ignores_unlabelled_positions(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    logits64 = torch.randn(shape, generator=generator, dtype=torch.float64) * 3
    labels = torch.randint(0, shape[-1], shape[:-1], generator=generator)
    unlabelled = torch.rand(shape[:-1], generator=generator) < 0.4
    unlabelled.view(-1)[0] = True
    unlabelled.view(-1)[1] = False
    labels = labels.masked_fill(unlabelled, IGNORE_INDEX)

    x = leaf(logits64)
    loss = hard_label_loss(x, labels)
    loss.backward()
    valid = labels != IGNORE_INDEX
    reference_x = leaf(logits64)
    manual = -torch.log_softmax(reference_x, -1)[valid].gather(-1, labels[valid][:, None]).mean()
    manual.backward()
    torch.testing.assert_close(loss.double(), manual, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, reference_x.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss.double(), F.cross_entropy(logits64[valid], labels[valid]), rtol=1e-5, atol=1e-6)
    assert torch.all(x.grad[~valid] == 0)


@pytest.mark.parametrize("shape", [(3, 7, 13), (5, 13)])
def test_hard_label_loss_with_no_label_is_zero_with_finite_grads(shape):
    x = leaf(torch.randn(shape) * 1e4)
    loss = hard_label_loss(x, torch.full(shape[:-1], IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0
    assert x.grad is not None and torch.isfinite(x.grad).all() and torch.all(x.grad == 0)
