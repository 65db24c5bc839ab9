"""Contrastive pre-training of the embedded tiny CLIP on captions of the embedded world.

Captions are "a <domain word> of a <colour> <shape>" (or, a third of the time, without
the colour) over the pre-training domains, framed plainly (``saft.data.synth``): neither
v1's ``textile`` domain nor the collected world's camera (``saft.data.synth_v2``: small
objects, distractors, a class-colour cue) is ever shown. Many images share a caption, so the contrastive targets are soft: every pair with
the same caption counts as a positive.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from saft.data.synth import PRETRAIN_DOMAINS, SHAPES, render
from saft.io import save_tensors, write_json
from saft.models import fingerprint_model, load_model
from saft.models.tiny import ARCH, tiny_tokenizer
from saft.progress import progress_bar

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
CHECKPOINT_FORMAT = "saft-tiny-clip/1"
CHECK_SEED = 4242


@dataclass
class PretrainConfig:
    per_domain_class: int = 1200  # images per (domain, shape)
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 100
    colourless_fraction: float = 0.33
    seed: int = 0
    eval_every: int = 250


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> normalised float [N, 3, H, W] (the model's preprocess)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    return (x - MEAN) / STD


def render_set(domains, per_class: int, seed: int, start: int = 0, progress: bool = True):
    """Images (uint8 array), labels, colours and domains of a rendered set."""
    items = [(d, s, i) for d in domains for i in range(start, start + per_class) for s in SHAPES]
    images = np.empty((len(items), 32, 32, 3), dtype=np.uint8)
    labels, colours, doms = [], [], []
    for k, (d, s, i) in enumerate(progress_bar(items, enabled=progress, desc="rendering", unit="img")):
        sample = render(d, s, i, seed)
        images[k] = np.asarray(sample.image)
        labels.append(SHAPES.index(s))
        colours.append(sample.colour)
        doms.append(d)
    return images, np.array(labels), colours, doms


def zero_shot_accuracy(model, tokenizer, images: torch.Tensor, labels: np.ndarray,
                       template: str = "a photo of a {}") -> float:
    model.eval()
    with torch.no_grad():
        text = F.normalize(model.encode_text(tokenizer([template.format(s) for s in SHAPES])), dim=-1)
        feats = torch.cat([F.normalize(model.encode_image(images[i:i + 512]), dim=-1)
                           for i in range(0, len(images), 512)])
    model.train()
    return float(((feats @ text.t()).argmax(-1).numpy() == labels).mean())


def pretrain(cfg: PretrainConfig, out: str | Path, log: Callable[[str], None] = print,
             progress: bool = True) -> dict:
    torch.manual_seed(cfg.seed)
    tokenizer = tiny_tokenizer()
    model = load_model(f"{ARCH}@random", seed=cfg.seed).model
    log(f"rendering {cfg.per_domain_class} images per shape in {len(PRETRAIN_DOMAINS)} domains")
    images, labels, colours, domains = render_set(PRETRAIN_DOMAINS, cfg.per_domain_class, cfg.seed,
                                                  progress=progress)
    words = {"photo_v2": "photo", "clutter": "photo"}
    eval_sets = {}
    for d in ("textile", "photo", "sketch", "cartoon", "photo_v2", "clutter"):
        ims, labs, _, _ = render_set([d], 20, seed=cfg.seed + 1000, progress=False)
        eval_sets[d] = (to_tensor(ims), labs)

    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 *
                                              (1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    model.train()
    history, t0 = [], time.perf_counter()
    bar = progress_bar(range(cfg.steps), enabled=progress, desc="pre-training", unit="step")
    for step in bar:
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=gen).numpy()
        drop = torch.rand(cfg.batch_size, generator=gen).numpy() < cfg.colourless_fraction
        captions = [
            f"a {words.get(domains[i], domains[i])} of a {SHAPES[labels[i]]}" if drop[k]
            else f"a {words.get(domains[i], domains[i])} of a {colours[i]} {SHAPES[labels[i]]}"
            for k, i in enumerate(idx)
        ]
        unique = sorted(set(captions))
        which = torch.tensor([unique.index(c) for c in captions])
        img = model.encode_image(to_tensor(images[idx]))
        txt = model.encode_text(tokenizer(unique))
        img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
        scale = model.logit_scale.exp().clamp(max=100)
        logits = scale * img @ txt.t()  # [B, U]
        loss_i = F.cross_entropy(logits, which)
        # text -> image: each unique caption's positives are all images carrying it
        pos = (which[None, :] == torch.arange(len(unique))[:, None]).float()
        loss_t = -(F.log_softmax(logits.t(), dim=-1) * pos / pos.sum(1, keepdim=True)).sum(1).mean()
        loss = (loss_i + loss_t) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            accs = {d: zero_shot_accuracy(model, tokenizer, *eval_sets[d]) for d in eval_sets}
            history.append({"step": step + 1, "loss": loss.item(), "seconds": time.perf_counter() - t0, **accs})
            log(f"step {step + 1}: loss {loss.item():.3f}  zero-shot " +
                "  ".join(f"{d} {100 * a:.1f}" for d, a in accs.items()))
    model.eval()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    fp = fingerprint_model(model)  # weights + configuration, as load_model reports it
    meta = {"arch": ARCH, "fingerprint": fp, "config": str(asdict(cfg))}
    save_tensors(out, state, meta, CHECKPOINT_FORMAT)
    seconds = time.perf_counter() - t0
    write_card(out, {"config": asdict(cfg), "history": history, "seconds": round(seconds, 1)})
    return {"fingerprint": fp, "history": history, "seconds": seconds}


def reference_accuracy(model, tokenizer) -> dict[str, float]:
    """Zero-shot accuracy on a fixed generated check set (recorded with the checkpoint)."""
    out = {}
    for domain in ("textile", "photo", "sketch"):
        ims, labs, _, _ = render_set([domain], 10, seed=CHECK_SEED, progress=False)
        out[domain] = zero_shot_accuracy(model, tokenizer, to_tensor(ims), labs)
    return out


def write_card(checkpoint: str | Path, extra: dict) -> Path:
    """``<checkpoint>.json``: fingerprint, reference zero-shot accuracy and how it was trained."""
    checkpoint = Path(checkpoint)
    loaded = load_model(f"{ARCH}@{checkpoint}")
    card = {"arch": ARCH, "fingerprint": loaded.fingerprint, "check_seed": CHECK_SEED,
            "reference_zero_shot": reference_accuracy(loaded.model, loaded.tokenizer), **extra}
    path = checkpoint.with_suffix(".json")
    write_json(path, card)
    return path
