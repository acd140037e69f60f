"""Several expert segments per iteration, on one process and split over gloo ranks (float64)."""
import pytest
import torch
import torch.multiprocessing as mp

from distill_utils import MultilabelContrastiveLoss
from distill_utils.runtime.distributed import Ranks, share_of
from distill_utils.distillation.batched import supports_batching
from distill_utils.distillation.matching import (KEEP, RECOMPUTE, KeepChoice, MiniBatchSampler, SegmentNoise,
                                                 TrajectoryMatcher, unrolled_autograd_loss)
from distill_utils.distillation import segments as segments_module
from distill_utils.distillation.segments import (BATCHED, SEQUENTIAL, BatchingChoice, Segment, draw_seeds,
                                                 match_segments, seeded_generators)
from networks import SIDES
from tests.test_matching import build, grads_of

STEPS = 3


def problem(count: int, trainable: bool = True):
    """A float64 matching problem with ``count`` segments (own start, target and seed each)."""
    model, synthetic, start, target = build(trainable, "lowrank")
    generator = torch.Generator().manual_seed(7)
    segments = []
    for j, seed in enumerate(draw_seeds(generator, count)):
        shift = {s: 0.01 * j * torch.randn(start[s].shape, generator=generator, dtype=torch.float64) for s in SIDES}
        segments.append(Segment({s: start[s] + shift[s] for s in SIDES}, {s: target[s] + shift[s] for s in SIDES},
                                seed))
    sampler = MiniBatchSampler(len(synthetic), 4, torch.Generator().manual_seed(1))
    return model, synthetic, segments, [sampler.next() for _ in range(STEPS)]


@pytest.mark.parametrize("trainable, batched", [(True, False), (True, True), (False, False), (False, True)],
                         ids=["trainable_sequential", "trainable_batched", "frozen_sequential", "frozen_batched"])
def test_segments_step_with_the_mean_of_their_unrolled_autograd_gradients(trainable, batched):
    model, synthetic, segments, batches = problem(3, trainable)
    criterion = MultilabelContrastiveLoss("WBCE")
    matcher = TrajectoryMatcher(model, criterion, STEPS, blend=0.4)
    result = match_segments(matcher, synthetic, segments, 3, batches, batching=batched)
    fast = grads_of(synthetic)

    losses, reference = [], {}
    for segment in segments:  # independently: plain autograd with the segment's own draws
        synthetic.zero_grad(set_to_none=True)
        with seeded_generators(segment.seed, torch.device("cpu")):
            loss = unrolled_autograd_loss(model, criterion, synthetic, segment.start, segment.target, batches,
                                          blend=0.4, noise=matcher.segment_noise(segment.seed))
        loss.backward()
        losses.append(loss.item())
        for name, grad in grads_of(synthetic).items():
            reference[name] = reference.get(name, 0) + grad / 3
    assert result.loss == pytest.approx(sum(losses) / 3, rel=1e-10)
    assert losses[0] != pytest.approx(losses[1], rel=1e-6)  # different problems, or the test proves nothing
    for name in reference:
        assert torch.allclose(fast[name], reference[name], rtol=1e-7, atol=1e-10), name


def test_batched_segments_give_what_sequential_segments_give():
    model, synthetic, segments, batches = problem(3, trainable=False)
    matcher = TrajectoryMatcher(model, MultilabelContrastiveLoss("InfoNCE"), STEPS, blend=0.3,
                                normalization="joint")
    assert supports_batching(matcher)
    runs = []
    for batched in (True, False):
        synthetic.zero_grad(set_to_none=True)
        runs.append((match_segments(matcher, synthetic, segments, 3, batches, batching=batched), grads_of(synthetic)))
    (batched, grads_b), (sequential, grads_s) = runs
    assert batched.loss == pytest.approx(sequential.loss, rel=1e-12)
    assert batched.per_side == pytest.approx(sequential.per_side, rel=1e-12)
    assert batched.start_distance == pytest.approx(sequential.start_distance, rel=1e-12)
    for name in grads_s:
        assert grads_s[name].abs().max() > 0, name
        assert torch.allclose(grads_b[name], grads_s[name], rtol=1e-10, atol=1e-14), name


def test_an_encoder_that_draws_its_own_dropout_is_never_batched(monkeypatch):
    model, synthetic, segments, batches = problem(2, trainable=True)
    assert supports_batching(TrajectoryMatcher(model, MultilabelContrastiveLoss("WBCE"), STEPS))
    model.image_encoder.extra = torch.nn.Dropout(0.2)  # a draw batching could not give as an input
    matcher = TrajectoryMatcher(model, MultilabelContrastiveLoss("WBCE"), STEPS)
    assert not supports_batching(matcher)
    monkeypatch.setattr("distill_utils.distillation.segments.match_batched",
                        lambda *a: pytest.fail("batched a drawing encoder"))
    match_segments(matcher, synthetic, segments, 2, batches, batching=True)


def test_auto_batching_times_both_after_keep_graphs_chose_and_keeps_the_sequential_result(monkeypatch):
    model, synthetic, segments, batches = problem(2, trainable=False)
    matcher = TrajectoryMatcher(model, MultilabelContrastiveLoss("WBCE"), STEPS, "auto")
    matcher.keep_choice.observe(keep_s=1.0, recompute_s=2.0)
    choice = BatchingChoice()
    ran = []
    real = segments_module.match_batched
    monkeypatch.setattr(segments_module, "match_batched", lambda *a: ran.append("vmap") or real(*a))
    match_segments(matcher, synthetic, segments, 2, batches, batching=choice)
    assert ran == [] and choice.deciding  # keep_graphs auto's second trial runs alone
    match_segments(matcher, synthetic, segments, 2, batches, batching=choice)
    trial = grads_of(synthetic)
    assert ran == ["vmap"] and len(choice.batched_s) == len(choice.sequential_s) == 1
    match_segments(matcher, synthetic, segments, 2, batches, batching=False)
    for name, grad in grads_of(synthetic).items():  # the trial's batched gradients were thrown away
        assert torch.equal(trial[name], grad), name


def test_batching_choice_keeps_the_faster_and_ranks_agree():
    choice = BatchingChoice(trials=2)
    choice.observe(batched_s=1.0, sequential_s=2.0)
    assert choice.deciding
    choice.observe(batched_s=3.0, sequential_s=1.5)
    assert choice.choice == BATCHED  # best of the trials: 1.0 against 1.5
    slow_batched = torch.tensor([1.0, 10.0])  # (sequential, batched): the other rank's batched run was slow
    agreed = BatchingChoice(trials=1, agree=lambda times: times.mul_(slow_batched.to(times.dtype)))
    agreed.observe(batched_s=1.0, sequential_s=2.0)  # alone batching wins; the sum says sequential
    assert agreed.choice == SEQUENTIAL
    restored = BatchingChoice()
    restored.load_state_dict(choice.state_dict())
    assert restored.choice == BATCHED and restored.sequential_s == [2.0, 1.5]


def test_a_segment_seed_fixes_its_draws_and_leaves_the_global_generator_alone():
    model, synthetic, segments, batches = problem(2)
    matcher = TrajectoryMatcher(model, MultilabelContrastiveLoss("WBCE"), STEPS, blend=0.5)
    before = torch.get_rng_state()
    runs = []
    for noise in (1, 2):  # whatever the global generator holds, the seeded segment draws the same
        torch.manual_seed(noise)
        synthetic.zero_grad(set_to_none=True)
        with seeded_generators(segments[0].seed, torch.device("cpu")):
            matcher.match(synthetic, segments[0].start, segments[0].target, batches,
                          matcher.segment_noise(segments[0].seed))
        runs.append(synthetic.images.grad.clone())
        assert torch.equal(torch.get_rng_state(), torch.manual_seed(noise).get_state())
    assert torch.equal(runs[0], runs[1])
    torch.set_rng_state(before)


def test_segment_noise_draws_dropout_at_its_rate_and_blends_within_the_batch():
    noise = SegmentNoise(seed=3, blend=0.5, dropout={"image": (0.25, 64), "text": (0.0, 8)})
    batches = [torch.arange(40), torch.arange(40)]
    first, second = list(noise.steps(batches, torch.zeros(1, dtype=torch.float64)))
    image = first.dropout["image"]
    assert set(image.unique().tolist()) == {0.0, 1 / 0.75}
    assert (image == 0).double().mean().item() == pytest.approx(0.25, abs=0.03)
    assert torch.equal(first.dropout["text"], torch.ones(40, 8, dtype=torch.float64))
    assert sorted(first.blend.partner["image"].tolist()) == list(range(40))
    assert 0 <= first.blend.weight["text"].min() and first.blend.weight["text"].max() <= 0.5
    assert not torch.equal(first.dropout["image"], second.dropout["image"])  # each step draws afresh
    again = list(noise.steps(batches, torch.zeros(1, dtype=torch.float64)))  # a second pass: the same draws
    assert torch.equal(again[1].dropout["image"], second.dropout["image"])
    assert torch.equal(again[1].blend.partner["text"], second.blend.partner["text"])


def test_one_segment_draws_no_seed_and_k_segments_draw_k():
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert draw_seeds(generator, 1) == [None]
    assert torch.equal(generator.get_state(), state)  # K=1 leaves the phase's stream as it always was
    seeds = draw_seeds(generator, 4)
    assert len(set(seeds)) == 4


def test_segments_split_into_contiguous_equal_shares():
    assert [list(share_of(4, Ranks(r, 2))) for r in (0, 1)] == [[0, 1], [2, 3]]
    assert list(share_of(3, Ranks(0, 1))) == [0, 1, 2]
    with pytest.raises(ValueError, match="do not split evenly"):
        share_of(3, Ranks(0, 2))


def _rank_worker(rank: int, world: int, store: str, count: int, out: str, threads: int, trainable: bool) -> None:
    import torch.distributed as dist
    torch.set_num_threads(threads)  # as the parent's: a kernel's sums depend on its thread count
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model, synthetic, segments, batches = problem(count, trainable)
        ranks = Ranks(rank, world)
        own = [segments[j] for j in share_of(count, ranks)]
        result = match_segments(TrajectoryMatcher(model, MultilabelContrastiveLoss("WBCE"), STEPS), synthetic, own,
                                count, batches, ranks, timeout_s=60, batching=not trainable)
        torch.save({"grads": grads_of(synthetic), "loss": result.loss}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("count", [2, 4])
@pytest.mark.parametrize("trainable", [True, False], ids=["sequential", "batched"])
def test_two_gloo_ranks_give_what_one_process_gives(tmp_path, count, trainable):
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "store"), count, str(tmp_path / "out"), torch.get_num_threads(),
                                 trainable), nprocs=2, join=True)
    model, synthetic, segments, batches = problem(count, trainable)
    result = match_segments(TrajectoryMatcher(model, MultilabelContrastiveLoss("WBCE"), STEPS), synthetic, segments,
                            count, batches, batching=not trainable)
    alone = grads_of(synthetic)
    for rank in (0, 1):
        shared = torch.load(tmp_path / f"out.{rank}", weights_only=True)
        assert shared["loss"] == pytest.approx(result.loss, rel=1e-12)
        for name, grad in alone.items():
            if count == 2 and trainable:  # one after another, a + b on either side: the very same sums
                assert torch.equal(shared["grads"][name], grad), name
            else:  # (a + b) + (c + d) against ((a + b) + c) + d, or batched products summed in another order
                assert torch.allclose(shared["grads"][name], grad, rtol=1e-12, atol=1e-15), name


def test_a_timed_trial_leaves_what_keeping_every_graph_leaves():
    """The trial's recomputing match is thrown away: gradients, loss and the global generator end as
    after a match that keeps every graph (bit for bit, the trainable encoder included)."""
    outcomes = []
    for keep_graphs in (STEPS, "auto"):
        model, synthetic, segments, batches = problem(1)
        model, synthetic = model.float(), synthetic.float()
        start = {s: v.float() for s, v in segments[0].start.items()}
        target = {s: v.float() for s, v in segments[0].target.items()}
        torch.manual_seed(3)
        matcher = TrajectoryMatcher(model, MultilabelContrastiveLoss("InfoNCE"), STEPS, keep_graphs)
        result = matcher.match(synthetic, start, target, batches)
        outcomes.append((result.loss, grads_of(synthetic), torch.get_rng_state()))
    (loss_a, grads_a, rng_a), (loss_b, grads_b, rng_b) = outcomes
    assert loss_a == loss_b and torch.equal(rng_a, rng_b)
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def test_auto_keeps_the_faster_policy_after_its_trials_and_ranks_agree():
    choice = KeepChoice(trials=2)
    choice.observe(keep_s=1.0, recompute_s=0.9)
    assert choice.deciding
    choice.observe(keep_s=0.95, recompute_s=0.7)
    assert choice.choice == RECOMPUTE
    agreed = KeepChoice(trials=1, agree=lambda times: times.mul_(torch.tensor([1.0, 10.0], dtype=times.dtype)))
    agreed.observe(keep_s=1.0, recompute_s=0.5)  # the other rank's recomputing was slow: the sum says keep
    assert agreed.choice == KEEP
    restored = KeepChoice()
    restored.load_state_dict(choice.state_dict())
    assert restored.choice == RECOMPUTE and restored.keep_s == [1.0, 0.95]


def test_after_its_trials_auto_runs_the_chosen_policy_only(monkeypatch):
    model, synthetic, segments, batches = problem(1)
    matcher = TrajectoryMatcher(model, MultilabelContrastiveLoss("WBCE"), STEPS, "auto")
    ran = []
    real = TrajectoryMatcher._match_keeping

    def counted(self, keep_graphs, *args):
        ran.append(keep_graphs)
        return real(self, keep_graphs, *args)

    monkeypatch.setattr(TrajectoryMatcher, "_match_keeping", counted)
    matcher.keep_choice.observe(keep_s=10.0, recompute_s=0.0)  # a first trial where recomputing won outright
    for _ in range(2):
        matcher.match(synthetic, segments[0].start, segments[0].target, batches)
    assert ran == [RECOMPUTE, KEEP, RECOMPUTE]  # the second trial (both), then the choice alone
    assert matcher.keep_choice.choice == RECOMPUTE
