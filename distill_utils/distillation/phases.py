"""The distillation's phases, top to bottom: each phase's synthetic set starts from real pairs, steps
along its experts' segments, is evaluated and saved, and hands its final (EMA) set to the next phase.

:func:`run_phases` is the loop over phases; :func:`run_phase` one phase's loop over iterations, with
its exact resume (the loop's state in ``latest.pt`` at every evaluation). ``distill_ptm-st.py`` parses
the flags, claims the run folder, loads data, experts and the student (:class:`Prepared`) and calls
:func:`run_phases`; a torchrun process other than rank 0 runs the same loop and writes nothing.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..data.context import DataContext
from ..experts import trajectories
from ..experts.snapshot_cache import GIB, SnapshotCache
from ..outputs.visualize import nearest_captions, save_grid, write_captions
from ..runtime import checkpoint
from ..runtime.distributed import SINGLE, Ranks, share_of, sum_across
from ..runtime.progress import progress
from ..runtime.runlog import MetricsLogger, format_recall, git_sha
from ..runtime.runs import RunFolder
from ..students.evaluation import EvalSettings, evaluate_subsets
from ..students.retrieval import RetrievalBenchmark
from .batched import supports_batching
from .losses import MultilabelContrastiveLoss
from .matching import AUTO, KeepChoice, MiniBatchSampler, TrajectoryMatcher
from .prototypes import prototype_pairs
from .segments import BATCHED, SEQUENTIAL, BatchingChoice, Segment, draw_seeds, match_segments
from .starts import StartRanges, StartSampler, dynamic_ranges, mean_change_per_epoch
from .synthetic import ExponentialMovingAverage, FrozenSubset, SyntheticRates, SyntheticSet, make_similarity

log = logging.getLogger("ptmst.distill")


@dataclass(frozen=True)
class DistillSettings:
    """What the phases read of a run's flags (``distill_ptm-st.py --help`` says what each means);
    ``flags`` is every resolved flag, recorded in each checkpoint and in the resume state."""
    seed: int
    name: str
    num_queries: Tuple[int, ...]
    image_size: int
    pix_init: str
    txt_init: str
    pair_init: str
    phase_init: str
    sim_type: str
    alpha: float
    learn_sim: bool
    lr_teacher_img: float
    lr_teacher_txt: float
    lr_img: float
    lr_txt: float
    lr_lr: float
    lr_sim: float
    momentum_syn: float
    momentum_lr: float
    momentum_sim: float
    clamp_lr: Optional[float]
    ema_decay: float
    async_starts: str
    expert_epochs: int
    syn_steps: int
    mini_batch_size: int
    loss_type: str
    keep_graphs: Union[int, str]
    blend: float
    match_norm: str
    student_autocast: str
    expert_cache_gb: Optional[float]
    segments_per_iter: int
    segment_batching: str
    dist_timeout: float
    eval_it: int
    eval_init: bool
    disabled_wandb: bool
    wandb_project: str
    students: EvalSettings  # how the evaluation students train
    flags: Mapping[str, object]


@dataclass(frozen=True)
class PhaseSpec:
    index: int
    buffer_path: str
    min_start: int
    max_start: int
    num_queries: int
    iterations: int
    sim_rank: int


def open_buffers(specs: Sequence[PhaseSpec], expert_epochs: int) -> List[trajectories.TrajectoryBuffer]:
    """Open every phase's folder; every expert must have the snapshots the phase's start range and
    --expert_epochs reach, finite."""
    buffers = []
    for spec in specs:
        buffer = trajectories.TrajectoryBuffer(Path(spec.buffer_path))
        needed = spec.max_start - 1 + expert_epochs
        buffer.check_snapshots(needed, f"phase {spec.index} (--max_start_epoch {spec.max_start} with "
                                       f"--expert_epochs {expert_epochs})")
        buffers.append(buffer)
    return buffers


class ExpertCycle:
    """Experts in a seeded random order, cycled (reshuffled at each wrap). The saved order names the
    experts (file and trajectory), not positions in the folder's list, so a resume after an expert was
    moved out or added draws the experts the order names and skips the missing ones."""

    def __init__(self, experts: List[trajectories.Expert], generator: torch.Generator):
        self.experts = experts
        self.generator = generator
        self.order: List[str] = []
        self.position = 0
        self._by_name = {expert.name: expert for expert in experts}

    def next(self) -> trajectories.Expert:
        while self.position < len(self.order) and self.order[self.position] not in self._by_name:
            self.position += 1  # an expert moved out of the folder since the state was saved
        if self.position >= len(self.order):
            self.order = [self.experts[i].name for i in torch.randperm(len(self.experts), generator=self.generator)]
            self.position = 0
        expert = self._by_name[self.order[self.position]]
        self.position += 1
        return expert

    def state_dict(self) -> dict:
        return {"order": self.order, "position": self.position, "experts": sorted(self._by_name)}

    def load_state_dict(self, state: dict) -> None:
        order = state["order"]
        if order and isinstance(order[0], int):  # a state written before orders named their experts
            saved = state.get("experts") or [e.name for e in self.experts]
            order = [saved[i] if i < len(saved) else f"#{i}" for i in order]
        self.order, self.position = list(order), state["position"]
        before = set(state.get("experts", self.order))
        removed, added = sorted(before - set(self._by_name)), sorted(set(self._by_name) - before)
        if removed or added:
            log.warning("the experts changed since this state was saved (%s%s): the run goes on with the experts "
                        "there now, so from here its draws differ from an uninterrupted run's",
                        f"gone: {', '.join(removed)}" if removed else "",
                        ("; " if removed and added else "") + (f"new: {', '.join(added)}" if added else ""))


def initial_pairs(spec: PhaseSpec, options: DistillSettings, data: DataContext, generator: torch.Generator,
                  joint: Optional["JointFeatures"]) -> torch.Tensor:
    """Which training pairs start the phase: random ones, or the prototypes of --pair_init prototype."""
    if options.pair_init == "prototype":
        return prototype_pairs(joint.image, joint.text, spec.num_queries, generator)
    order = torch.randperm(len(data.train), generator=generator)
    if options.phase_init == "independent":
        return order[:spec.num_queries]
    return first_untaken(order, spec.num_queries, earlier_random_picks(spec.index, options, len(data.train)))


def first_untaken(order: torch.Tensor, count: int, taken: set) -> torch.Tensor:
    """The first ``count`` entries of ``order`` outside ``taken``; when too few are left, the earliest taken
    ones fill the rest (a training set smaller than the phases together)."""
    free = [i for i in order.tolist() if i not in taken]
    if len(free) < count:
        free += [i for i in order.tolist() if i in taken][:count - len(free)]
    return torch.tensor(free[:count], dtype=order.dtype)


def earlier_random_picks(index: int, options: DistillSettings, available: int) -> set:
    """The training pairs phases 0 .. index-1 started from under --phase_init disjoint (each phase's draw
    depends only on the seed and its index, so they are drawn again here, on a resume too)."""
    taken: set = set()
    for k in range(index):
        order = torch.randperm(available, generator=torch.Generator().manual_seed(options.seed * 1000 + k))
        taken.update(first_untaken(order, options.num_queries[k], taken).tolist())
    return taken


@dataclass
class JointFeatures:
    """Per training pair: the starting image encoder's features and the cached text features."""
    image: torch.Tensor
    text: torch.Tensor


@torch.no_grad()
def training_pair_features(student, data: DataContext, device: torch.device, batch_size: int,
                           num_workers: int) -> JointFeatures:
    encoder = copy.deepcopy(student.image_encoder).eval()
    loader = torch.utils.data.DataLoader(data.train, batch_size=batch_size, num_workers=num_workers,
                                         generator=torch.Generator())  # leaves the global generator alone
    features = [encoder(images.to(device)).float().cpu()
                for images, _ in progress(loader, desc="prototype features", unit="batch", leave=False)]
    return JointFeatures(torch.cat(features), data.train_text.float().cpu())


def initial_set(spec: PhaseSpec, options: DistillSettings, data: DataContext, generator: torch.Generator,
                joint: Optional[JointFeatures] = None) -> SyntheticSet:
    """``num_queries`` training pairs (test-time transform) and their cached text features."""
    picks = initial_pairs(spec, options, data, generator, joint)
    if options.pix_init == "real":
        images = torch.stack([data.train[i][0] for i in picks.tolist()])
    else:
        images = torch.randn(spec.num_queries, 3, options.image_size, options.image_size, generator=generator)
    if options.txt_init == "real":
        texts = data.train_text[picks]
    else:
        texts = torch.randn(spec.num_queries, data.text_dim, generator=generator)
    similarity = make_similarity(options.sim_type, spec.num_queries, spec.sim_rank, options.alpha, generator)
    return SyntheticSet(images, texts, similarity, options.lr_teacher_img, options.lr_teacher_txt, options.learn_sim)


@dataclass
class Run:
    """What the phases share: paths, data, model config, benchmarks, logger."""
    options: DistillSettings
    folder: Path
    data: DataContext
    config: object
    device: torch.device
    test: RetrievalBenchmark
    val: Optional[RetrievalBenchmark]
    metrics: MetricsLogger
    settings: EvalSettings
    joint: Optional[JointFeatures] = None  # for --pair_init prototype
    ranks: Ranks = SINGLE  # under torchrun only rank 0 evaluates and writes

    @property
    def files(self) -> RunFolder:
        """The run folder's file names (one place knows them)."""
        return RunFolder(self.folder)

    @property
    def latest(self) -> Path:
        return self.files.latest


def evaluate_and_save(run: Run, finished: List[FrozenSubset], ema_set: SyntheticSet, phase: int, it: int,
                      loss: Optional[float]) -> dict:
    subsets = finished + [FrozenSubset.from_set(ema_set)]
    summary = evaluate_subsets(subsets, run.config, run.settings, run.test, run.val, run.device,
                               desc=f"phase {phase} it {it}: students")
    record = {"phase": phase, "iteration": it, "matching_loss": loss, "syn_lr_img": ema_set.syn_lr_img.item(),
              "syn_lr_txt": ema_set.syn_lr_txt.item(),
              **{k: v for k, v in summary["selected"]["mean"].items()},
              **{f"{k}_std": v for k, v in summary["selected"]["std"].items()}}
    run.metrics.log(record)
    log.info("phase %d it %d | %s ± %.2f", phase, it, format_recall(summary["selected"]["mean"]),
             summary["selected"]["std"]["r_mean"])
    checkpoint.save_distilled(run.files.checkpoint(phase, it), ema_set, checkpoint_config(run), phase, it)
    save_grid(ema_set.images, run.folder / f"synthetic_{phase}_{it}.png")
    write_captions(run.folder / f"captions_{phase}_{it}.txt",
                   nearest_captions(ema_set.texts, run.data.train_text, run.data.train.captions))
    return record


def checkpoint_config(run: Run) -> dict:
    return {**run.options.flags, "text_dim": run.data.text_dim, "git_sha": git_sha()}


@dataclass
class PhaseLoop:
    """Everything a phase's loop carries from one iteration to the next (what resume restores)."""
    synthetic: SyntheticSet
    optimizer: torch.optim.Optimizer
    ema: ExponentialMovingAverage
    sampler: MiniBatchSampler
    cycle: ExpertCycle
    generator: torch.Generator
    starts: StartSampler
    keep_choice: Optional[KeepChoice] = None  # --keep_graphs auto's timings and choice
    batching_choice: Optional[BatchingChoice] = None  # --segment_batching auto's

    def state_dict(self, device: torch.device) -> dict:
        return {"synthetic": self.synthetic.state_dict(), "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.state_dict(), "sampler": self.sampler.state_dict(), "cycle": self.cycle.state_dict(),
                "generator": self.generator.get_state(),
                "keep_choice": self.keep_choice.state_dict() if self.keep_choice is not None else None,
                "batching_choice": self.batching_choice.state_dict() if self.batching_choice is not None else None}

    def load_state_dict(self, state: dict, device: torch.device, rates: SyntheticRates) -> None:
        """Restore the loop; the optimizer then takes ``rates`` (the flags of this start), so a resume
        with a lower --lr_img after a NaN stop really steps at the lower rate."""
        self.synthetic.load_state_dict(state["synthetic"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group, fresh in zip(self.optimizer.param_groups, self.synthetic.param_groups(rates)):
            group["lr"], group["momentum"] = fresh["lr"], fresh["momentum"]
        self.ema.load_state_dict({"decay": state["ema"]["decay"],
                                  "shadow": {k: v.to(device) for k, v in state["ema"]["shadow"].items()}})
        self.sampler.load_state_dict(state["sampler"])
        self.cycle.load_state_dict(state["cycle"])
        self.generator.set_state(state["generator"])
        if self.keep_choice is not None and state.get("keep_choice"):
            self.keep_choice.load_state_dict(state["keep_choice"])
        if self.batching_choice is not None and state.get("batching_choice"):
            self.batching_choice.load_state_dict(state["batching_choice"])


def global_rng_state(device: torch.device) -> dict:
    """The global generators, which head dropout and blend draws use between checkpoints."""
    return {"torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_global_rng(state: dict, device: torch.device) -> None:
    rng = state.get("rng") or (state.get("loop") or {})  # states before 2026-12 kept it in the loop only
    if rng.get("torch_rng") is not None:
        torch.set_rng_state(rng["torch_rng"])
    if rng.get("cuda_rng") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda_rng"], device)


def save_resume_state(run: Run, phase: int, it: int, finished: List[FrozenSubset],
                      loop: Optional[PhaseLoop] = None) -> None:
    """``latest.pt``: where to continue (phase, iteration), the finished subsets, the loop's state and
    the global generators' (at a phase's end too: the next phase's dropout masks come from them)."""
    state = {"phase": phase, "iteration": it, "finished": [asdict(s) for s in finished],
             "args": dict(run.options.flags),
             "loop": loop.state_dict(run.device) if loop is not None else None,
             "rng": global_rng_state(run.device)}
    checkpoint.save_state(run.latest, state)


def check_finite(result, synthetic: SyntheticSet, run: Run, phase: int, it: int) -> None:
    bad = not math.isfinite(result.loss) or any(
        p.grad is not None and not torch.isfinite(p.grad).all() for p in synthetic.parameters())
    if bad:
        raise FloatingPointError(nan_stop_message(run, phase, it, f"the matching loss or its gradient is NaN/Inf "
                                                                  f"(loss {result.loss})"))


def check_stepped_set(synthetic: SyntheticSet, run: Run, phase: int, it: int) -> None:
    """The step itself can overflow a finite gradient (a huge rate): nothing non-finite reaches the EMA."""
    bad = [name for name, p in synthetic.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise FloatingPointError(nan_stop_message(run, phase, it, f"the synthetic set's step made {', '.join(bad)} "
                                                                  f"NaN/Inf"))


def nan_stop_message(run: Run, phase: int, it: int, what: str) -> str:
    return (f"phase {phase}, iteration {it}: {what}. Stopped; the last good checkpoint is "
            f"{last_checkpoint(run, phase)} and {run.latest.name} holds the state saved with it. Lower --lr_img / "
            f"--lr_txt / --lr_sim / --lr_lr (or set --clamp_lr), then rerun with --resume --name {run.options.name}: "
            f"the resumed run steps at the lowered rates.")


def last_checkpoint(run: Run, phase: int):
    saved = run.files.checkpoints(phase)
    return saved[-1] if saved else "none yet"


def out_of_memory_message(run: Run, phase: int, it: int, cached_bytes: int = 0) -> str:
    options = run.options
    cache = (f", lower --expert_cache_gb ({cached_bytes / GIB:.1f} GiB of expert snapshots are kept on the GPU; "
             f"0 keeps none)" if cached_bytes else "")
    lower = ("Give --keep_graphs a count below the kept_graphs the progress bar showed" if options.keep_graphs == AUTO
             else "Lower --keep_graphs")
    return (f"phase {phase}, iteration {it}: out of GPU memory in the matching step "
            f"(--keep_graphs {options.keep_graphs}, "
            f"--mini_batch_size {options.mini_batch_size}, --syn_steps {options.syn_steps}). {lower} first "
            f"(0 keeps memory constant in --syn_steps){cache}, then --mini_batch_size, and rerun with --resume "
            f"--name {options.name}: it continues from the last checkpoint ({last_checkpoint(run, phase)}).")


def synthetic_rates(options: DistillSettings) -> SyntheticRates:
    return SyntheticRates(options.lr_img, options.lr_txt, options.lr_lr, options.lr_sim, options.momentum_syn,
                          options.momentum_lr,
                          options.momentum_sim)


def start_ranges(spec: PhaseSpec, buffer: trajectories.TrajectoryBuffer, mode: str) -> StartRanges:
    """The phase's range for both sides, or under ``dynamic`` each side's own (logged)."""
    window = (spec.min_start, spec.max_start)
    if mode != "dynamic":
        return StartRanges(window, window)
    experts = buffer.experts()
    last = min(e.num_snapshots for e in experts) - 1
    if last < 1:
        raise trajectories.TrajectoryError(f"--async_starts dynamic needs experts of at least two snapshots; "
                                           f"{buffer.folder} holds {last + 1}")
    change = {side: mean_change_per_epoch(experts, side, last, lambda e, s, t: e.flat(s, t))
              for side in trajectories.SIDES}
    ranges = dynamic_ranges(change["image"], change["text"], *window)
    log.info("phase %d asynchronous starts: image from %s, text from %s (per-epoch change image %s, text %s)",
             spec.index, ranges.image, ranges.text, [f"{c:.3g}" for c in change["image"]],
             [f"{c:.3g}" for c in change["text"]])
    return ranges


def start_phase(run: Run, spec: PhaseSpec, buffer: trajectories.TrajectoryBuffer) -> PhaseLoop:
    options = run.options
    generator = torch.Generator().manual_seed(options.seed * 1000 + spec.index)
    synthetic = initial_set(spec, options, run.data, generator, run.joint).to(run.device)
    starts = StartSampler(start_ranges(spec, buffer, options.async_starts), options.async_starts != "off", generator)
    return PhaseLoop(synthetic, torch.optim.SGD(synthetic.param_groups(synthetic_rates(options)), lr=0.0),
                     ExponentialMovingAverage(synthetic, options.ema_decay),
                     MiniBatchSampler(spec.num_queries, options.mini_batch_size, generator),
                     ExpertCycle(buffer.experts(), generator), generator, starts)


def distinct_segments(loop: PhaseLoop) -> int:
    """Experts times start snapshots (per side, for asynchronous starts) a phase can draw from."""
    starts = loop.starts
    image, text = starts.ranges.image, starts.ranges.text
    pairs = (image[1] - image[0]) * ((text[1] - text[0]) if starts.asynchronous else 1)
    return len(loop.cycle.experts) * pairs


def warn_repeated_segments(count: int, loop: PhaseLoop, spec: PhaseSpec) -> None:
    distinct = distinct_segments(loop)
    if count > distinct:
        log.warning("--segments_per_iter %d exceeds the %d distinct segments phase %d can draw (%d experts x its "
                    "start snapshots): some repeat in every iteration, which costs time and adds nothing; give at "
                    "most %d, or more experts or a wider --min_start_epoch/--max_start_epoch", count, distinct,
                    spec.index, len(loop.cycle.experts), distinct)


def draw_segments(loop: PhaseLoop, count: int):
    """The iteration's draws from the phase's generator, in the order :mod:`distill_utils.distillation.segments`
    documents: each segment's expert and start (the mini-batches and the seeds follow)."""
    return [(loop.cycle.next(), loop.starts.draw()) for _ in range(count)]


def segment_batching(flag: str, matcher: TrajectoryMatcher, own: int, ranks, timeout_s: float):
    """What --segment_batching asks for, as match_segments takes it (False where it cannot apply)."""
    if own == 1 or flag == SEQUENTIAL:
        return False
    if not supports_batching(matcher):
        log.info("segments run one after another: this image encoder draws its own dropout, which batching "
                 "cannot give it")
        return False
    if flag == BATCHED:
        return True
    choice = BatchingChoice()
    if ranks.distributed:  # every rank batches alike, by the ranks' summed timings
        choice.agree = lambda times: sum_across([times], ranks, timeout_s)
    return choice


def run_phase(run: Run, spec: PhaseSpec, buffer: trajectories.TrajectoryBuffer, student, finished,
              state) -> FrozenSubset:
    options, device, ranks = run.options, run.device, run.ranks
    loop = start_phase(run, spec, buffer)
    synthetic, optimizer, ema, sampler = loop.synthetic, loop.optimizer, loop.ema, loop.sampler
    matcher = TrajectoryMatcher(student, MultilabelContrastiveLoss(options.loss_type), options.syn_steps,
                                options.keep_graphs,
                                blend=options.blend, normalization=options.match_norm,
                                autocast=torch.bfloat16 if options.student_autocast == "bf16" else None)
    if matcher.keep_choice is not None:
        loop.keep_choice = matcher.keep_choice
        if ranks.distributed:  # every rank keeps or recomputes alike, by the ranks' summed timings
            matcher.keep_choice.agree = lambda times: sum_across([times], ranks, options.dist_timeout)
    snapshots = SnapshotCache.from_flag(device, options.expert_cache_gb)
    count, mine = options.segments_per_iter, share_of(options.segments_per_iter, ranks)
    warn_repeated_segments(count, loop, spec)
    batching = segment_batching(options.segment_batching, matcher, len(mine), ranks, options.dist_timeout)
    if isinstance(batching, BatchingChoice):
        loop.batching_choice = batching
    it, skip_eval_at = 0, None
    if state is not None and state["phase"] == spec.index and state["loop"] is not None:
        loop.load_state_dict(state["loop"], device, synthetic_rates(options))
        it = skip_eval_at = state["iteration"]  # evaluated and saved just before that state was written
        log.info("resuming phase %d at iteration %d", spec.index, it)
    ema_set = copy.deepcopy(synthetic)
    loss = None
    with progress(total=spec.iterations, initial=it, desc=f"phase {spec.index}", unit="it",
                  disable=not ranks.main) as bar:
        while True:
            due = it == spec.iterations or (it % options.eval_it == 0 and (it > 0 or options.eval_init))
            if due and it != skip_eval_at and ranks.main:
                evaluate_and_save(run, finished, ema.copy_to(ema_set), spec.index, it, loss)
                save_resume_state(run, spec.index, it, finished, loop)
            if it == spec.iterations:
                break
            draws = draw_segments(loop, count)
            batches = [sampler.next().to(device) for _ in range(options.syn_steps)]
            seeds = draw_seeds(loop.generator, count)
            own = [Segment(*segment_ends(snapshots, expert, epochs, options.expert_epochs), seeds[j])
                   for j, (expert, epochs) in enumerate(draws) if j in mine]
            optimizer.zero_grad(set_to_none=True)
            try:
                result = match_segments(matcher, synthetic, own, count, batches, ranks, options.dist_timeout,
                                        batching)
            except torch.OutOfMemoryError:
                raise MemoryError(out_of_memory_message(run, spec.index, it, snapshots.kept_bytes)) from None
            check_finite(result, synthetic, run, spec.index, it)
            snapshots.settle_budget()
            optimizer.step()
            if options.clamp_lr is not None:
                with torch.no_grad():
                    synthetic.syn_lr_img.clamp_(min=options.clamp_lr)
                    synthetic.syn_lr_txt.clamp_(min=options.clamp_lr)
            check_stepped_set(synthetic, run, spec.index, it)
            ema.update(synthetic)
            loss = result.loss
            it += 1
            bar.set_postfix(loss=f"{loss:.4f}", lr_img=f"{synthetic.syn_lr_img.item():.4g}",
                            kept_graphs=f"{result.kept_graphs}/{options.syn_steps}", refresh=False)
            bar.update()  # redraws at the bar's own pace (a log file: once a minute)
            if it % 10 == 0 and ranks.main:
                run.metrics.log({"phase": spec.index, "iteration": it, "matching_loss": loss,
                                 "kept_graphs": result.kept_graphs, "syn_lr_img": synthetic.syn_lr_img.item(),
                                 "syn_lr_txt": synthetic.syn_lr_txt.item(), **{
                                     f"loss_{side}": v for side, v in result.per_side.items()}})
    log.info("phase %d expert snapshots: %s", spec.index, snapshots.describe())
    return FrozenSubset.from_set(ema.copy_to(ema_set))


def segment_ends(snapshots: SnapshotCache, expert, epochs: dict, expert_epochs: int):
    """A segment's start snapshot and target (``expert_epochs`` later) on both sides."""
    start = {side: snapshots.get(expert, side, epochs[side]) for side in trajectories.SIDES}
    target = {side: snapshots.get(expert, side, epochs[side] + expert_epochs) for side in trajectories.SIDES}
    return start, target


@dataclass
class Prepared:
    """What every process builds before the phases: experts, data, student, benchmarks (rank 0's)."""
    options: DistillSettings
    buffers: list
    device: torch.device
    data: DataContext
    config: object
    student: torch.nn.Module
    test: Optional[RetrievalBenchmark]
    val: Optional[RetrievalBenchmark]
    joint: Optional[JointFeatures]
    ranks: Ranks


class _NoMetrics:
    """The metrics of a process other than rank 0: it writes none."""

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def run_phases(setting: Prepared, folder: Path, specs: Sequence[PhaseSpec], state: Optional[dict]) -> Path:
    options, device = setting.options, setting.device
    metrics = (MetricsLogger(RunFolder(folder).metrics, not options.disabled_wandb, options.wandb_project, options.name,
                             dict(options.flags)) if setting.ranks.main else _NoMetrics())
    run = Run(options, folder, setting.data, setting.config, device, setting.test, setting.val, metrics,
              options.students, setting.joint, setting.ranks)
    # the phases' global stream starts here, whatever the set-up drew (a text cache built or read), and a
    # resume continues it from where its state was saved, at a phase's end as well as inside one
    torch.manual_seed(options.seed)
    if state is not None:
        restore_global_rng(state, device)
    finished = [FrozenSubset(**s) for s in state["finished"]] if state else []
    try:
        for spec, buffer in zip(specs, setting.buffers):
            if spec.index < len(finished):
                continue
            finished.append(run_phase(run, spec, buffer, setting.student, finished, state))
            if setting.ranks.main:
                save_resume_state(run, spec.index + 1, 0, finished)
    finally:
        run.metrics.close()
    log.info("done: %s", folder)
    return folder
