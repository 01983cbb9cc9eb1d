"""DPO losses, implicit rewards, the LR schedule and the train/val split (tasks/train_dpo.py).

Every expected number is worked out by hand in the comments; none comes from
calling the function under test.
"""

import math

import pytest
import torch

from alignflow.tasks.train_dpo import dpo_losses
from alignflow.tasks.training import lr_factor, split_rows

# log pi(y_w) = -10, log pi(y_l) = -14, log pi_ref(y_w) = -11, log pi_ref(y_l) = -13
#   z = (-10 - -14) - (-11 - -13) = 4 - 2 = 2
POLICY_C, POLICY_R, REF_C, REF_R = -10.0, -14.0, -11.0, -13.0
BETA = 0.1


def _t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_sigmoid_loss_hand_worked():
    # -log(sigmoid(beta * z)) = log(1 + e^{-0.2}) = log(1.8187307531) = 0.5981388693815918
    losses, _, _ = dpo_losses(_t(POLICY_C), _t(POLICY_R), _t(REF_C), _t(REF_R), BETA, "sigmoid")
    assert losses.shape == (1,)
    assert losses.item() == pytest.approx(0.5981388693815918, abs=1e-12)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.2)), abs=1e-12)


def test_sigmoid_loss_is_default_and_batched():
    # z = 2 -> log(1 + e^{-0.2}) = 0.598139; z = 0 -> log 2 = 0.693147; z = -2 -> log(1 + e^{0.2}) = 0.798139
    pc = _t(-10.0, -5.0, -5.0)
    pr = _t(-14.0, -5.0, -7.0)
    rc = _t(-11.0, -5.0, -5.0)
    rr = _t(-13.0, -5.0, -9.0)
    losses, _, _ = dpo_losses(pc, pr, rc, rr, BETA)
    expected = [0.5981388693815918, math.log(2.0), 0.7981388693815918]
    assert losses.tolist() == pytest.approx(expected, abs=1e-12)


def test_sigmoid_loss_gradient():
    # d/d(policy_chosen) of -log sigmoid(beta z) = -beta * sigmoid(-beta z) = -0.1 * 0.450166 = -0.0450166;
    # the rejected side gets the opposite sign.
    pc = _t(POLICY_C).requires_grad_()
    pr = _t(POLICY_R).requires_grad_()
    losses, _, _ = dpo_losses(pc, pr, _t(REF_C), _t(REF_R), BETA, "sigmoid")
    losses.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.04501660026875222, abs=1e-12)
    assert pr.grad.item() == pytest.approx(+0.04501660026875222, abs=1e-12)


def test_ipo_loss_hand_worked():
    # (z - 1 / (2 beta))^2 = (2 - 5)^2 = 9 ; with z = 5 it is exactly 0; z = 7 -> 4
    losses, _, _ = dpo_losses(
        _t(POLICY_C, 0.0, 0.0), _t(POLICY_R, -5.0, -7.0), _t(REF_C, 0.0, 0.0), _t(REF_R, 0.0, 0.0), BETA, "ipo"
    )
    assert losses.tolist() == pytest.approx([9.0, 0.0, 4.0], abs=1e-12)


def test_hinge_loss_hand_worked():
    # relu(1 - beta z): z = 2 -> 0.8 ; z = 10 -> 0 (exactly at the margin) ; z = 20 -> 0 ; z = -3 -> 1.3
    losses, _, _ = dpo_losses(
        _t(POLICY_C, 0.0, 0.0, 0.0),
        _t(POLICY_R, -10.0, -20.0, 3.0),
        _t(REF_C, 0.0, 0.0, 0.0),
        _t(REF_R, 0.0, 0.0, 0.0),
        BETA,
        "hinge",
    )
    assert losses.tolist() == pytest.approx([0.8, 0.0, 0.0, 1.3], abs=1e-12)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "hinge"])
def test_implicit_rewards(kind):
    # chosen reward  = beta (log pi(y_w) - log pi_ref(y_w)) = 0.1 * (-10 + 11) = 0.1
    # rejected reward = beta (log pi(y_l) - log pi_ref(y_l)) = 0.1 * (-14 + 13) = -0.1
    # the rewards do not depend on the loss kind
    _, chosen, rejected = dpo_losses(_t(POLICY_C), _t(POLICY_R), _t(REF_C), _t(REF_R), BETA, kind)
    assert chosen.item() == pytest.approx(0.1, abs=1e-12)
    assert rejected.item() == pytest.approx(-0.1, abs=1e-12)


def test_implicit_rewards_scale_with_beta():
    # beta = 0.5: chosen = 0.5 * 1 = 0.5, rejected = 0.5 * -1 = -0.5 ; sigmoid loss = log(1 + e^{-1}) = 0.3132617
    losses, chosen, rejected = dpo_losses(_t(POLICY_C), _t(POLICY_R), _t(REF_C), _t(REF_R), 0.5)
    assert (chosen.item(), rejected.item()) == pytest.approx((0.5, -0.5), abs=1e-12)
    assert losses.item() == pytest.approx(0.31326168751822286, abs=1e-12)


def test_identical_policy_and_reference_is_the_neutral_point():
    # policy == reference -> z = 0 and rewards 0: sigmoid loss log 2, ipo (1/(2 beta))^2 = 25, hinge 1
    x = _t(-3.0)
    y = _t(-4.0)
    expected = {"sigmoid": math.log(2.0), "ipo": 25.0, "hinge": 1.0}
    for kind, want in expected.items():
        losses, chosen, rejected = dpo_losses(x, y, x, y, BETA, kind)
        assert losses.item() == pytest.approx(want, abs=1e-12), kind
        assert chosen.item() == 0.0 and rejected.item() == 0.0


def test_unknown_loss_kind_raises():
    with pytest.raises(ValueError, match="unknown DPO loss 'kto'"):
        dpo_losses(_t(0.0), _t(0.0), _t(0.0), _t(0.0), BETA, "kto")


# -- lr_factor -----------------------------------------------------------------


def test_lr_factor_linear_warmup():
    # warmup = 10: step s < 10 gives (s + 1) / 10
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(4, 100, 10) == pytest.approx(0.5)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)


def test_lr_factor_cosine_endpoints():
    # after warmup: 0.5 (1 + cos(pi * (s - 10) / 90))
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)  # cos 0 = 1
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)  # cos(pi/2) = 0
    assert lr_factor(100, 100, 10) == pytest.approx(0.0, abs=1e-12)  # cos(pi) = -1
    assert lr_factor(250, 100, 10) == pytest.approx(0.0, abs=1e-12)  # clamped past the end
    # total 90, warmup 10, step 30: a quarter of the way -> 0.5 (1 + cos(pi/4)) = 0.5 (1 + 0.7071068) = 0.8535534
    assert lr_factor(30, 90, 10) == pytest.approx(0.8535533905932737)


def test_lr_factor_without_warmup_starts_at_one_and_decays_monotonically():
    assert lr_factor(0, 10, 0) == pytest.approx(1.0)
    values = [lr_factor(s, 10, 0) for s in range(11)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(0.0, abs=1e-12)


def test_lr_factor_total_equal_to_warmup_does_not_divide_by_zero():
    # total - warmup = 0 -> max(1, 0) = 1 in the denominator; step = total is the end of the schedule
    assert lr_factor(5, 5, 5) == pytest.approx(1.0)
    assert lr_factor(6, 5, 5) == pytest.approx(0.0, abs=1e-12)


# -- split_rows ---------------------------------------------------------------


def _rows(n, per_prompt=1):
    return [{"prompt_id": f"p{i}", "k": j} for i in range(n) for j in range(per_prompt)]


def test_split_rows_is_a_partition_and_deterministic():
    rows = _rows(200)
    train, val = split_rows(rows, 0.2, seed=0)
    assert len(train) + len(val) == 200
    assert {r["prompt_id"] for r in train}.isdisjoint({r["prompt_id"] for r in val})
    assert sorted(r["prompt_id"] for r in train + val) == sorted(r["prompt_id"] for r in rows)
    # roughly the requested fraction (200 draws, expectation 40)
    assert 15 <= len(val) <= 70
    again = split_rows(list(reversed(rows)), 0.2, seed=0)
    assert {r["prompt_id"] for r in again[1]} == {r["prompt_id"] for r in val}


def test_split_rows_keeps_a_prompt_on_one_side():
    rows = _rows(50, per_prompt=3)
    train, val = split_rows(rows, 0.3, seed=1)
    train_ids = {r["prompt_id"] for r in train}
    val_ids = {r["prompt_id"] for r in val}
    assert train_ids.isdisjoint(val_ids)
    assert all(sum(r["prompt_id"] == pid for r in val) == 3 for pid in val_ids)


def test_split_rows_seed_changes_the_split():
    rows = _rows(200)
    _, val0 = split_rows(rows, 0.5, seed=0)
    _, val1 = split_rows(rows, 0.5, seed=1)
    assert {r["prompt_id"] for r in val0} != {r["prompt_id"] for r in val1}


def test_split_rows_zero_fraction_is_all_train():
    rows = _rows(30)
    train, val = split_rows(rows, 0.0, seed=0)
    assert train == rows and val == []


def test_split_rows_always_keeps_one_training_pair():
    rows = _rows(5)
    train, val = split_rows(rows, 1.0, seed=0)  # every row would be validation
    assert len(train) == 1 and len(val) == 4
    assert train[0] == rows[0]
