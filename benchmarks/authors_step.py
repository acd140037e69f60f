"""One iteration of the authors' distillation loop, as their ``distill_ptm-st.py`` runs it, for the
benchmarks to time ours against.

What their timed region does each iteration, and so what :func:`authors_step` does, in order:

1. rebuild the student: the whole dual encoder (image encoder, projection heads) and the frozen text
   encoder its constructor creates, then a flat-parameter wrapper around each trained side;
2. read the expert: their ``buffer.py`` saves one trajectory per file, so their loop loads a new pair
   of whole files (``torch.load``, no memory map) every iteration;
3. first pass, ``syn_steps`` student steps: each takes the image-side gradient and then the text-side
   gradient with two ``autograd.grad(..., create_graph=True)`` calls, keeps a detached copy, and drops
   the graph-carrying gradients (``del``); the step's forward graph is dropped when the next step
   rebinds its tensors, so at most one step's graph is alive. Each new parameter vector is
   ``previous - lr.item() * detached_gradient``, chained to the previous one;
4. second pass: per step, recompute the forward at that step's parameters, take both sides'
   gradients again with ``create_graph=True``, and differentiate ``2 * (v . g_i) / D`` with respect to
   the step's image and text clones and similarity parameters, accumulating into full-size buffers;
5. step-size gradients through autograd on the matching loss.

One addition, so that its gradients can be compared with ours: the second pass replays each step's
dropout masks (the authors' draws fresh ones). Saving and restoring a generator state costs
microseconds. The weights the rebuild loads are random ones written where a download would be (see
:func:`prepare_rebuild`); after the first iteration they come from the page cache, as theirs do. Not
included: wandb logging.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.func import functional_call

from distill_utils.experts import trajectories
from distill_utils.distillation.matching import StudentParameters, capture_rng_state, restore_rng_state
from distill_utils.distillation.synthetic import SyntheticSet
from networks import SIDES, DualEncoderConfig, PretrainedWeightsUnavailable, create_image_encoder
from networks.text_encoders import _vocab_tokenizer


@dataclass
class Rebuild:
    """What the authors' loop constructs every iteration, from weights on disk as a download leaves
    them: the dual encoder with its image encoder's weights loaded from ``checkpoint_dir``, and the
    frozen text encoder (tokenizer and model ``from_pretrained``), moved to the device."""
    model_config: DualEncoderConfig
    text_folder: Optional[Path]

    def __call__(self, device: torch.device) -> torch.nn.Module:
        student = self.model_config.build(seed=0).to(device).train()
        if self.text_folder is not None:
            from transformers import AutoModel, AutoTokenizer
            if (self.text_folder / "tokenizer_config.json").is_file():
                AutoTokenizer.from_pretrained(self.text_folder)
            AutoModel.from_pretrained(self.text_folder).to(device).eval()
        return student


def prepare_rebuild(model_config: DualEncoderConfig, text_dim: int, folder: Path) -> Rebuild:
    """Write random weights where the rebuild reads them: ``{image_encoder}.pth`` and a text-model folder
    of the feature width (MiniLM-L6's shape for 384, BERT-base's for 768, else a 2-layer BERT)."""
    from transformers import BertConfig, BertModel  # as the distiller, transformers only where a text model is built
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    encoder = create_image_encoder(model_config.image_encoder, pretrained=False)
    torch.save(encoder.state_dict(), folder / f"{model_config.image_encoder}.pth")
    layers, heads, inner = {384: (6, 12, 1536), 768: (12, 12, 3072)}.get(text_dim, (2, 1, 4 * text_dim))
    config = BertConfig(hidden_size=text_dim, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=inner)
    text_folder = folder / "text_encoder"
    BertModel(config).save_pretrained(text_folder)
    try:
        _vocab_tokenizer().save_pretrained(text_folder)
    except PretrainedWeightsUnavailable:  # no vocabulary package on this machine: the model alone (the
        pass                              # tokenizer's load is about a millisecond of theirs)
    pretrained = replace(model_config, image_pretrained=True, checkpoint_dir=str(folder))
    return Rebuild(pretrained, text_folder)


def flat(snapshot) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in snapshot])


def authors_step(rebuild: Callable[[torch.device], torch.nn.Module], synthetic: SyntheticSet, folder: Path,
                 criterion, batches: List[torch.Tensor], start_epoch: int, device: torch.device,
                 seed: int = 7) -> Dict[str, torch.Tensor]:
    """Run one iteration; set ``.grad`` of the synthetic set's parameters; return the matching loss per side."""
    synthetic.zero_grad(set_to_none=True)
    student = rebuild(device)
    params = StudentParameters(student)
    files = {s: torch.load(trajectories.twin_path(folder, s, 0), weights_only=True) for s in SIDES}
    start = {s: flat(files[s][0][start_epoch]).to(device) for s in SIDES}
    target = {s: flat(files[s][0][start_epoch + 1]).to(device) for s in SIDES}
    eta = {s: synthetic.step_size(s).item() for s in SIDES}
    torch.manual_seed(seed)

    thetas = {s: [start[s].clone().requires_grad_(True)] for s in SIDES}
    grad_sum = {s: torch.zeros_like(start[s]) for s in SIDES}
    images, texts, sim_leaves, sim_blocks, rng_states = [], [], [], [], []
    for idx in batches:
        x = synthetic.images[idx]
        y = synthetic.texts[idx]
        images.append(x.clone())
        texts.append(y.clone())
        leaves, compose = synthetic.similarity.gather(idx)
        sim_leaves.append(leaves)
        sim_blocks.append(compose(*leaves))
        rng_states.append(capture_rng_state(device))
        logits = functional_call(student, params.as_dict({s: thetas[s][-1] for s in SIDES}), (x, y))
        loss = criterion(logits, sim_blocks[-1])
        gradients = {s: torch.autograd.grad(loss, thetas[s][-1], create_graph=True)[0] for s in SIDES}
        for s in SIDES:
            detached = gradients[s].detach().clone()
            thetas[s].append(thetas[s][-1] - eta[s] * detached)
            grad_sum[s] += detached
        del gradients

    distance = {s: F.mse_loss(start[s], target[s], reduction="sum") for s in SIDES}
    v = {s: eta[s] * (target[s] - start[s]) + eta[s] ** 2 * grad_sum[s] for s in SIDES}
    image_grad = torch.zeros_like(synthetic.images)
    text_grad = torch.zeros_like(synthetic.texts)
    for i, idx in enumerate(batches):
        restore_rng_state(rng_states[i], device)
        logits = functional_call(student, params.as_dict({s: thetas[s][i] for s in SIDES}), (images[i], texts[i]))
        loss = criterion(logits, sim_blocks[i])
        g = {s: torch.autograd.grad(loss, thetas[s][i], create_graph=True, retain_graph=True)[0] for s in SIDES}
        objective = sum((v[s] @ g[s]) / distance[s] for s in SIDES)
        found = torch.autograd.grad(2 * objective, [images[i], texts[i]] + sim_leaves[i])
        with torch.no_grad():
            image_grad[idx] += found[0]
            text_grad[idx] += found[1]
        synthetic.similarity.scatter_grad(idx, list(found[2:]))
    synthetic.images.grad = image_grad
    synthetic.texts.grad = text_grad

    losses = {}
    for s in SIDES:
        residual = start[s] - synthetic.step_size(s) * grad_sum[s] - target[s]
        losses[s] = residual.dot(residual) / distance[s]
        synthetic.step_size(s).grad = torch.autograd.grad(losses[s], synthetic.step_size(s))[0]
    return {s: value.detach() for s, value in losses.items()}

