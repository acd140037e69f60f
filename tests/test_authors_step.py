"""The benchmarks' baseline is the authors' iteration: same gradients as ours (float64), and graph
memory that does not grow with the number of student steps (theirs drops each step's graph)."""
import pytest
import torch

from benchmarks import distill_step
from benchmarks.authors_step import authors_step, flat, prepare_rebuild
from benchmarks.common import allocation_peak_bytes
from distill_utils import MultilabelContrastiveLoss
from distill_utils.experts import trajectories
from distill_utils.distillation.matching import MiniBatchSampler, TrajectoryMatcher
from distill_utils.distillation.synthetic import SyntheticSet, make_similarity
from networks import SIDES

CPU = torch.device("cpu")


def tiny(syn_steps: int, queries: int = 12):
    return distill_step.Config("convnet_tiny", 16, 7, num_queries=queries, mini_batch_size=4, syn_steps=syn_steps,
                               snapshots=4, repeats=1)


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def inputs(config, folder, sim_type="full"):
    model_config, synthetic = distill_step.make_inputs(config, folder)
    if sim_type == "lowrank":
        synthetic = SyntheticSet(synthetic.images.detach(), synthetic.texts.detach(),
                                 make_similarity("lowrank", len(synthetic), 3, 1.0, torch.Generator().manual_seed(5)),
                                 0.1, 0.1)
        with torch.no_grad():
            synthetic.similarity.right.normal_(generator=torch.Generator().manual_seed(6))  # not 0: R's gradient flows
    return model_config, synthetic


def batches_for(config, seed=1):
    sampler = MiniBatchSampler(config.num_queries, config.mini_batch_size, torch.Generator().manual_seed(seed))
    return [sampler.next() for _ in range(config.syn_steps)]


def our_gradients(model_config, synthetic, folder, loss, batches, keep_graphs):
    files = {s: torch.load(trajectories.twin_path(folder, s, 0), weights_only=True)[0] for s in SIDES}
    matcher = TrajectoryMatcher(model_config.build(seed=0), MultilabelContrastiveLoss(loss), len(batches), keep_graphs)
    synthetic.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    result = matcher.match(synthetic, {s: flat(files[s][1]) for s in SIDES}, {s: flat(files[s][2]) for s in SIDES},
                           batches)
    return {n: p.grad.clone() for n, p in synthetic.named_parameters()}, result


def authors_gradients(model_config, synthetic, folder, loss, batches):
    rebuild = prepare_rebuild(model_config, 7, folder / "weights")
    losses = authors_step(rebuild, synthetic, folder, MultilabelContrastiveLoss(loss), batches, 1, CPU)
    return {n: p.grad.clone() for n, p in synthetic.named_parameters()}, losses


@pytest.mark.parametrize("sim_type", ["full", "lowrank"])
@pytest.mark.parametrize("loss", ["WBCE", "InfoNCE"])
@pytest.mark.parametrize("keep_graphs", [0, 2, "auto"])
def test_the_authors_step_and_ours_give_the_same_gradients(float64, tmp_path, sim_type, loss, keep_graphs):
    config = tiny(syn_steps=4)
    model_config, synthetic = inputs(config, tmp_path, sim_type)
    batches = batches_for(config)
    theirs, their_losses = authors_gradients(model_config, synthetic, tmp_path, loss, batches)
    ours, result = our_gradients(model_config, synthetic, tmp_path, loss, batches, keep_graphs)
    assert set(ours) == set(theirs) and all(g.abs().max() > 0 for g in theirs.values())
    for name in theirs:
        scale = theirs[name].abs().max()
        assert (ours[name] - theirs[name]).abs().max() <= 1e-12 * scale, name
    assert result.loss == pytest.approx(sum(v.item() for v in their_losses.values()), rel=1e-12)


def peak_bytes(step, syn_steps, tmp_path):
    config = tiny(syn_steps, queries=4 * syn_steps)
    folder = tmp_path / str(syn_steps)
    folder.mkdir(parents=True)
    model_config, synthetic = inputs(config, folder)
    batches = batches_for(config)
    step(model_config, synthetic, folder, "WBCE", batches)  # set-up and first-call allocations outside
    return allocation_peak_bytes(lambda: step(model_config, synthetic, folder, "WBCE", batches))


def keep_every_graph(model_config, synthetic, folder, loss, batches):  # what the old re-creation held
    return our_gradients(model_config, synthetic, folder, loss, batches, keep_graphs=len(batches))


def test_the_authors_step_holds_about_one_steps_graph_whatever_the_step_count(tmp_path):
    two, eight = (peak_bytes(authors_gradients, n, tmp_path) for n in (2, 8))
    kept_two, kept_eight = (peak_bytes(keep_every_graph, n, tmp_path / "kept") for n in (2, 8))
    step_graph = (kept_eight - kept_two) / 6  # six more kept graphs: one step's graph, measured

    assert step_graph > 0.05 * kept_two
    assert eight - two < 1.5 * step_graph  # about one step's graph more (the clones per step add a little)
