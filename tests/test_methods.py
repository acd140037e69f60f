"""The methods of the field (--method presets) do what docs/methods.md says they do."""
import statistics

import pytest
import torch

from distill_utils import MultilabelContrastiveLoss
from distill_utils.app import distill
from distill_utils.distillation.methods import METHODS
from distill_utils.students.evaluation import StudentRun, both_protocols, select_on
from distill_utils.distillation.matching import MiniBatchSampler, TrajectoryMatcher, draw_blend, unrolled_autograd_loss
from distill_utils.distillation.prototypes import joint_features, kmeans, nearest_distinct, prototype_pairs
from distill_utils.distillation.starts import StartRanges, StartSampler, dynamic_ranges, mean_change_per_epoch
from distill_utils.distillation.synthetic import SyntheticRates, SyntheticSet, make_similarity
from networks import SIDES, Blend
from distill_utils.distillation import phases

from .test_matching import build, grads_of

REQUIRED = ["--buffer_path", "b", "--min_start_epoch", "0", "--max_start_epoch", "2"]


# ---- presets ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_preset_sets_its_documented_flags(method):
    argv = ["--method", method] + (REQUIRED if method != "ptmst" else
                                   ["--buffer_path", "a", "b", "--min_start_epoch", "0", "1", "--max_start_epoch", "2", "3"])
    args = distill.parse_args(argv)
    for flag, value in METHODS[method].items():
        if flag != "sim_rank":
            assert getattr(args, flag) == value, flag
    assert args.subset_num == (2 if method == "ptmst" else 1)


def test_the_presets_differ_exactly_as_documented():
    assert METHODS["mttvl"]["learn_sim"] is False and METHODS["lors"]["learn_sim"] is True
    assert METHODS["amd"]["async_starts"] == "dynamic" and METHODS["amd"]["pair_init"] == "prototype"
    assert METHODS["repblend"]["image_trainable"] is False and METHODS["repblend"]["match_norm"] == "joint"
    assert METHODS["repblend"]["blend"] > 0
    for name in ("mttvl", "lors", "amd", "repblend"):
        assert METHODS[name]["subset_num"] == 1
    plain = {k: v for k, v in METHODS["lors"].items()}
    for name, changed in (("amd", {"async_starts", "pair_init"}), ("repblend", {"image_trainable", "blend", "match_norm"}),
                          ("mttvl", {"learn_sim", "sim_type"})):
        differing = {k for k in set(plain) | set(METHODS[name]) if plain.get(k) != METHODS[name].get(k)}
        assert differing == changed, name


def test_explicit_flags_win_over_the_preset():
    args = distill.parse_args(["--method", "amd", "--pair_init", "random", "--num_queries", "30", "--Iteration", "7"]
                              + REQUIRED)
    assert args.pair_init == "random" and args.async_starts == "dynamic"
    assert args.num_queries == [30] and args.Iteration == [7]


def test_a_one_phase_preset_with_two_phase_lists_names_the_flag(capsys):
    with pytest.raises(SystemExit):
        distill.parse_args(["--method", "lors", "--num_queries", "10", "20"] + REQUIRED)
    assert "--num_queries has 2 value(s)" in capsys.readouterr().err


def test_blend_outside_zero_one_is_refused(capsys):
    with pytest.raises(SystemExit):
        distill.parse_args(["--method", "repblend", "--blend", "1.5"] + REQUIRED)
    assert "--blend must be in [0, 1]" in capsys.readouterr().err


# ---- mttvl: the similarity is never learned --------------------------------------------------------

def test_a_fixed_similarity_gets_no_gradient_no_optimizer_group_and_never_changes():
    model, synthetic, start, target = build(True, "full")
    fixed = SyntheticSet(synthetic.images.detach(), synthetic.texts.detach(), make_similarity("full", 6).double(),
                         0.05, 0.07, learn_similarity=False).double()
    before = fixed.similarity.matrix.detach().clone()
    groups = fixed.param_groups(SyntheticRates(1.0, 1.0, 1.0, 100.0))
    assert all(p is not fixed.similarity.matrix for g in groups for p in g["params"])
    optimizer = torch.optim.SGD(groups, lr=0.0)
    matcher = TrajectoryMatcher(model, MultilabelContrastiveLoss("WBCE"), syn_steps=2)
    sampler = MiniBatchSampler(6, 4, torch.Generator().manual_seed(0))
    for _ in range(3):
        optimizer.zero_grad()
        matcher.match(fixed, start, target, [sampler.next() for _ in range(2)])
        assert fixed.similarity.matrix.grad is None
        assert fixed.images.grad.abs().sum() > 0
        optimizer.step()
    assert torch.equal(fixed.similarity.matrix, before)
    assert torch.equal(before, torch.eye(6, dtype=torch.float64))


# ---- blending and joint normalisation stay exact ---------------------------------------------------

@pytest.mark.parametrize("trainable", [True, False], ids=["image_trainable", "image_frozen"])
@pytest.mark.parametrize("normalization", ["per_side", "joint"])
@pytest.mark.parametrize("keep_graphs", [0, 1, 3])
def test_blending_and_joint_normalisation_gradients_equal_unrolled_autograd(trainable, normalization, keep_graphs):
    model, synthetic, start, target = build(trainable, "lowrank")
    criterion = MultilabelContrastiveLoss("WBCE")
    sampler = MiniBatchSampler(len(synthetic), 4, torch.Generator().manual_seed(1))
    batches = [sampler.next() for _ in range(3)]

    torch.manual_seed(7)
    matcher = TrajectoryMatcher(model, criterion, syn_steps=3, keep_graphs=keep_graphs, blend=0.5,
                                normalization=normalization)
    result = matcher.match(synthetic, start, target, batches)
    fast = grads_of(synthetic)
    synthetic.zero_grad(set_to_none=True)

    torch.manual_seed(7)
    reference = unrolled_autograd_loss(model, criterion, synthetic, start, target, batches, blend=0.5,
                                       normalization=normalization)
    reference.backward()
    slow = grads_of(synthetic)
    assert result.loss == pytest.approx(reference.item(), rel=1e-10)
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-9, atol=1e-12, msg=name)


def test_blending_changes_the_objective_and_joint_normalisation_divides_by_the_summed_distance():
    model, synthetic, start, target = build(False, "full")
    criterion = MultilabelContrastiveLoss("WBCE")
    batches = [torch.tensor([0, 1, 2, 3]), torch.tensor([2, 3, 4, 5])]

    def result(blend, normalization):
        torch.manual_seed(3)
        return TrajectoryMatcher(model, criterion, 2, blend=blend, normalization=normalization).match(
            synthetic, start, target, batches)
    plain, blended = result(0.0, "per_side"), result(0.5, "per_side")
    assert abs(plain.loss - blended.loss) > 1e-8
    joint = result(0.0, "joint")
    total = sum(plain.start_distance.values())
    for side in SIDES:  # ||r_s||^2 is the same; only the denominator differs
        assert joint.per_side[side] * total == pytest.approx(plain.per_side[side] * plain.start_distance[side], rel=1e-12)


def test_blend_mixes_each_row_with_its_partner_at_its_weight():
    rows = torch.arange(12, dtype=torch.float64).reshape(4, 3)
    blend = Blend({"image": torch.tensor([1, 0, 3, 2]), "text": torch.tensor([0, 1, 2, 3])},
                  {"image": torch.tensor([0.5, 0.0, 0.25, 1.0]), "text": torch.tensor([0.3, 0.3, 0.3, 0.3])})
    mixed = blend.apply("image", rows)
    for m, (partner, weight) in enumerate(zip([1, 0, 3, 2], [0.5, 0.0, 0.25, 1.0])):
        torch.testing.assert_close(mixed[m], (1 - weight) * rows[m] + weight * rows[partner])
    torch.testing.assert_close(blend.apply("text", rows), rows)  # partner = itself


def test_draw_blend_is_off_at_zero_and_within_bounds_otherwise():
    assert draw_blend(5, 0.0, torch.device("cpu")) is None
    torch.manual_seed(0)
    blend = draw_blend(50, 0.3, torch.device("cpu"))
    for side in SIDES:
        assert sorted(blend.partner[side].tolist()) == list(range(50))
        assert 0 <= float(blend.weight[side].min()) and float(blend.weight[side].max()) <= 0.3


# ---- asynchronous starts ---------------------------------------------------------------------------

def test_synchronous_starts_repeat_the_single_draw_of_before():
    generator, reference = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    sampler = StartSampler(StartRanges((1, 4), (1, 4)), asynchronous=False, generator=generator)
    for _ in range(20):
        draw = sampler.draw()
        assert draw["image"] == draw["text"] == int(torch.randint(1, 4, (1,), generator=reference))


def test_asynchronous_starts_draw_each_side_from_its_own_range():
    sampler = StartSampler(StartRanges((0, 2), (3, 6)), asynchronous=True, generator=torch.Generator().manual_seed(0))
    draws = [sampler.draw() for _ in range(200)]
    assert {d["image"] for d in draws} == {0, 1} and {d["text"] for d in draws} == {3, 4, 5}
    same = StartSampler(StartRanges((0, 4), (0, 4)), asynchronous=True, generator=torch.Generator().manual_seed(0))
    pairs = [same.draw() for _ in range(200)]
    assert any(p["image"] != p["text"] for p in pairs) and any(p["image"] == p["text"] for p in pairs)


def test_dynamic_ranges_follow_the_median_rule_by_hand():
    image = [4.0, 4.0, 4.0, 4.0, 4.0]
    text = [8.0, 4.0, 2.0, 1.0, 0.5]  # ratio 0.5 1 2 4 8, median 2
    ranges = dynamic_ranges(image, text, low=0, high=10)
    # R_V = first epoch with ratio > 2 = 4, R_L = last epoch with ratio <= 2 = 3
    assert ranges.image == (0, 5) and ranges.text == (0, 4)
    cut = dynamic_ranges(image, text, low=1, high=3)
    assert cut.image == (1, 3) and cut.text == (1, 3)
    flat = dynamic_ranges([1.0, 1.0], [1.0, 1.0], low=0, high=9)  # never above the median: the whole trajectory
    assert flat.image == (0, 3) and flat.text == (0, 3)
    never_empty = dynamic_ranges([1.0, 2.0], [1.0, 1.0], low=2, high=9)
    assert never_empty.image[1] > never_empty.image[0] and never_empty.text[1] > never_empty.text[0]


def test_mean_change_per_epoch_is_the_distance_between_consecutive_expert_means():
    generator = torch.Generator().manual_seed(0)
    snapshots = torch.randn(3, 4, 5, generator=generator, dtype=torch.float64)  # experts x epochs x parameters
    changes = mean_change_per_epoch([0, 1, 2], "image", 3, lambda e, side, t: snapshots[e, t])
    for t in range(1, 4):
        by_hand = sum((snapshots[e, t] - snapshots[e, t - 1]) / 3 for e in range(3)).norm()
        assert changes[t - 1] == pytest.approx(float(by_hand), rel=1e-12)


# ---- prototype initialisation ----------------------------------------------------------------------

def test_prototypes_are_the_pairs_nearest_the_kmeans_centres_by_brute_force():
    generator = torch.Generator().manual_seed(0)
    image = torch.cat([torch.randn(15, 6, generator=generator) + 4 * k for k in range(4)])
    text = torch.cat([torch.randn(15, 5, generator=generator) - 3 * k for k in range(4)])
    points = joint_features(image, text)
    centres = kmeans(points, 4, torch.Generator().manual_seed(1))
    # a fixed point of Lloyd's iteration: every centre is the mean of the points nearest it
    nearest = [min(range(4), key=lambda c: float((p - centres[c]).square().sum())) for p in points]
    for c in range(4):
        members = [points[i] for i in range(len(points)) if nearest[i] == c]
        torch.testing.assert_close(centres[c], sum(members) / len(members))
    picks = prototype_pairs(image, text, 4, torch.Generator().manual_seed(1))
    for c, pick in enumerate(picks.tolist()):
        distances = [float((points[i] - centres[c]).square().sum()) for i in range(len(points))]
        assert pick == min(range(len(points)), key=distances.__getitem__)
    assert sorted({nearest[p] for p in picks.tolist()}) == [0, 1, 2, 3]  # one prototype per cluster


def test_two_centres_never_share_a_pair():
    points = torch.tensor([[0.0, 0.0], [10.0, 10.0], [0.1, 0.0]], dtype=torch.float64)
    centres = torch.tensor([[0.0, 0.0], [0.0, 0.01]], dtype=torch.float64)
    assert nearest_distinct(points, centres).tolist() == [0, 2]


# ---- one set of students, both protocols -----------------------------------------------------------

def test_both_protocols_select_by_val_and_by_test_from_one_history():
    def point(test, val):
        return {"test": {"r_mean": test, "x": test}, "val": {"r_mean": val}}
    histories = [[point(10, 5), point(30, 4), point(20, 9)], [point(7, 1), point(7, 1), point(3, 2)]]
    assert select_on(histories[0], "val")["r_mean"] == 20 and select_on(histories[0], "test")["r_mean"] == 30
    assert select_on(histories[1], "test") is histories[1][0]["test"]  # ties: the first
    runs = [StudentRun(h[0]["test"], h[-1]["test"], h) for h in histories]
    both = both_protocols(runs)
    assert both["val"]["selected"]["mean"]["r_mean"] == pytest.approx(statistics.fmean([20, 3]))
    assert both["paper"]["selected"]["mean"]["r_mean"] == pytest.approx(statistics.fmean([30, 7]))
    assert both["paper"]["selected"]["std"]["r_mean"] == pytest.approx(statistics.pstdev([30, 7]))
    assert both["val"]["selected_val_r_mean"] == pytest.approx(statistics.fmean([9, 2]))  # val's own best, never test's


def test_the_distiller_starts_from_the_prototypes_when_asked():
    from types import SimpleNamespace
    generator = torch.Generator().manual_seed(0)
    joint = phases.JointFeatures(torch.randn(40, 6, generator=generator), torch.randn(40, 5, generator=generator))
    spec = distill.PhaseSpec(0, "b", 0, 2, 5, 10, 2)
    data = SimpleNamespace(train=[None] * 40)
    picks = phases.initial_pairs(spec, SimpleNamespace(pair_init="prototype"), data, torch.Generator().manual_seed(3),
                                  joint)
    assert torch.equal(picks, prototype_pairs(joint.image, joint.text, 5, torch.Generator().manual_seed(3)))
    random = phases.initial_pairs(spec, SimpleNamespace(pair_init="random", phase_init="disjoint"), data,
                                   torch.Generator().manual_seed(3), joint)
    assert torch.equal(random, torch.randperm(40, generator=torch.Generator().manual_seed(3))[:5])
