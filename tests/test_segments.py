"""Several expert segments per iteration, on one process and split over gloo ranks (float64)."""
import pytest
import torch
import torch.multiprocessing as mp

from distill_utils import MultilabelContrastiveLoss
from distill_utils.distributed import Ranks, share_of
from distill_utils.matching import KEEP, RECOMPUTE, KeepChoice, MiniBatchSampler, TrajectoryMatcher, unrolled_autograd_loss
from distill_utils.segments import Segment, draw_seeds, match_segments, seeded_generators
from networks import SIDES
from tests.test_matching import build, grads_of

STEPS = 3


def problem(count: int):
    """A float64 matching problem with ``count`` segments (own start, target and seed each)."""
    model, synthetic, start, target = build(True, "lowrank")
    generator = torch.Generator().manual_seed(7)
    segments = []
    for j, seed in enumerate(draw_seeds(generator, count)):
        shift = {s: 0.01 * j * torch.randn(start[s].shape, generator=generator, dtype=torch.float64) for s in SIDES}
        segments.append(Segment({s: start[s] + shift[s] for s in SIDES}, {s: target[s] + shift[s] for s in SIDES},
                                seed))
    sampler = MiniBatchSampler(len(synthetic), 4, torch.Generator().manual_seed(1))
    return model, synthetic, segments, [sampler.next() for _ in range(STEPS)]


def test_two_segments_step_with_the_mean_of_their_unrolled_autograd_gradients():
    model, synthetic, segments, batches = problem(2)
    criterion = MultilabelContrastiveLoss("WBCE")
    result = match_segments(TrajectoryMatcher(model, criterion, STEPS), synthetic, segments, 2, batches)
    fast = grads_of(synthetic)

    losses, reference = [], {}
    for segment in segments:  # independently: plain autograd under the segment's own seed
        synthetic.zero_grad(set_to_none=True)
        with seeded_generators(segment.seed, torch.device("cpu")):
            loss = unrolled_autograd_loss(model, criterion, synthetic, segment.start, segment.target, batches)
        loss.backward()
        losses.append(loss.item())
        for name, grad in grads_of(synthetic).items():
            reference[name] = reference.get(name, 0) + grad / 2
    assert result.loss == pytest.approx(sum(losses) / 2, rel=1e-10)
    assert losses[0] != pytest.approx(losses[1], rel=1e-6)  # two different problems, or the test proves nothing
    for name in reference:
        assert torch.allclose(fast[name], reference[name], rtol=1e-7, atol=1e-10), name


def test_a_segment_seed_fixes_its_dropout_and_leaves_the_global_generator_alone():
    model, synthetic, segments, batches = problem(2)
    matcher = TrajectoryMatcher(model, MultilabelContrastiveLoss("WBCE"), STEPS)
    before = torch.get_rng_state()
    runs = []
    for noise in (1, 2):  # whatever the global generator holds, the seeded segment draws the same masks
        torch.manual_seed(noise)
        synthetic.zero_grad(set_to_none=True)
        with seeded_generators(segments[0].seed, torch.device("cpu")):
            matcher.match(synthetic, segments[0].start, segments[0].target, batches)
        runs.append(synthetic.images.grad.clone())
        assert torch.equal(torch.get_rng_state(), torch.manual_seed(noise).get_state())
    assert torch.equal(runs[0], runs[1])
    torch.set_rng_state(before)


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


def _rank_worker(rank: int, world: int, store: str, count: int, out: str, threads: int) -> None:
    import torch.distributed as dist
    torch.set_num_threads(threads)  # as the parent's: a kernel's sums depend on its thread count
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model, synthetic, segments, batches = problem(count)
        ranks = Ranks(rank, world)
        own = [segments[j] for j in share_of(count, ranks)]
        result = match_segments(TrajectoryMatcher(model, MultilabelContrastiveLoss("WBCE"), STEPS), synthetic, own,
                                count, batches, ranks, timeout_s=60)
        torch.save({"grads": grads_of(synthetic), "loss": result.loss}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("count", [2, 4])
def test_two_gloo_ranks_give_what_one_process_gives(tmp_path, count):
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "store"), count, str(tmp_path / "out"), torch.get_num_threads()),
             nprocs=2, join=True)
    model, synthetic, segments, batches = problem(count)
    result = match_segments(TrajectoryMatcher(model, MultilabelContrastiveLoss("WBCE"), STEPS), synthetic, segments,
                            count, batches)
    alone = grads_of(synthetic)
    for rank in (0, 1):
        shared = torch.load(tmp_path / f"out.{rank}", weights_only=True)
        assert shared["loss"] == pytest.approx(result.loss, rel=1e-12)
        for name, grad in alone.items():
            if count == 2:  # a + b on either side: the very same sums
                assert torch.equal(shared["grads"][name], grad), name
            else:  # (a + b) + (c + d) against ((a + b) + c) + d
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
