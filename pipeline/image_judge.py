"""The image judge: the verifier of the image world, as `world.verify` is for text.

A small CNN trained on the world's real images (training digits under all 8 property combinations) reads a
16x16 grayscale image and returns, for the digit and each property, a probability over its values. Its accuracy on
the 360 held-out real digits (x 8 combinations) is reported. Saved as `judge/model.safetensors` +
`judge/config.json` (no pickle).

It scores generated images against their captions (each property the caption asks for, and all of them), and it
is the simulated annotator's eyes for image preference pairs: the annotator prefers the image that matches more of
its caption (the digit first), and flips its label with probability `label_noise`, like the text annotators.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline import log as stage_log
from pipeline.images import PROPERTIES

HEADS = {"digit": 10, **{p: len(v) for p, v in PROPERTIES.items()}}
RESOLUTION = 16


def _net(width: int):
    import torch.nn as nn

    class Judge(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
                nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
                nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.BatchNorm2d(4 * width), nn.ReLU())
            self.shared = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 16, 128), nn.ReLU())
            self.heads = nn.ModuleDict({k: nn.Linear(128 + 4 * width if k == "digit" else 128, n)
                                        for k, n in HEADS.items()})

        def forward(self, x):
            import torch

            h = self.body(x)
            flat = self.shared(h)
            pooled = h.amax((2, 3))  # position-free features for the digit
            return {k: head(torch.cat([flat, pooled], 1) if k == "digit" else flat) for k, head in self.heads.items()}

    return Judge()


def to_judge_input(images):
    """Any images (N x C x H x W in [0, 1]) as the judge sees them: grayscale, 16x16."""
    import torch.nn.functional as F

    x = images.float().mean(1, keepdim=True) if images.shape[1] != 1 else images.float()
    if x.shape[-1] != RESOLUTION or x.shape[-2] != RESOLUTION:
        x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="area")
    return x


class ImageJudge:
    def __init__(self, model, config: dict):
        self.model, self.config = model.eval(), config

    @classmethod
    def load(cls, folder) -> "ImageJudge":
        from safetensors.torch import load_file

        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        model = _net(config["width"])
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return cls(model, config)

    def save(self, folder) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")

    def read(self, images, batch_size: int = 512) -> dict:
        """{"digit": N x 10 probabilities, "size": N x 2, ...} for images N x C x H x W in [0, 1]."""
        import torch

        x = to_judge_input(images)
        out = {k: [] for k in HEADS}
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                for k, logits in self.model(x[i:i + batch_size]).items():
                    out[k].append(logits.softmax(-1))
        return {k: torch.cat(v) for k, v in out.items()}

    def predict(self, images) -> list[dict]:
        """Per image: {"digit": 7, "size": "large", ...} with each value's probability under "p"."""
        probs = self.read(images)
        rows = []
        for i in range(len(images)):
            row, p = {}, {}
            for k, pr in probs.items():
                j = int(pr[i].argmax())
                row[k] = j if k == "digit" else PROPERTIES[k][j]
                p[k] = float(pr[i, j])
            rows.append({**row, "p": p})
        return rows


def _targets(labels, n_combos: int):
    """Head targets for render_all's layout: image i under combination c."""
    import torch

    from pipeline.images import ATTR_COMBOS

    digit = labels[:, None].expand(-1, n_combos)
    out = {"digit": digit}
    for j, (prop, values) in enumerate(PROPERTIES.items()):
        idx = torch.tensor([values.index(a[j]) for a in ATTR_COMBOS])
        out[prop] = idx[None].expand(len(labels), -1)
    return out


def train_judge(seed: int, epochs: int = 24, width: int = 16, batch_size: int = 64, log=None) -> tuple:
    """Train on the real training digits, score the held-out ones. Returns (judge, metrics). `log`: where progress
    lines go (default: the stage's log)."""
    import torch

    log = log or stage_log.info

    from pipeline.images import render_all

    torch.manual_seed(seed)
    images, labels = render_all("train", RESOLUTION)
    n, c = images.shape[:2]
    targets = _targets(labels, c)
    model = _net(width)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * ((n + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    model.train()
    for epoch in range(epochs):  # an epoch: every real training digit once, under a random combination
        perm = torch.randperm(n, generator=gen)
        combo = torch.randint(0, c, (n,), generator=gen)
        total = 0.0
        for i in range(0, n, batch_size):
            b = perm[i:i + batch_size]
            xb = images[b, combo[b]]
            shift = torch.randint(-1, 2, (1,), generator=gen).item()  # slight vertical jitter: robust to samples
            xb = torch.roll(xb, shifts=shift, dims=2)
            out = model(xb + 0.05 * torch.randn(xb.shape, generator=gen))
            loss = sum(torch.nn.functional.cross_entropy(out[k], targets[k][b, combo[b]]) for k in HEADS)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(b)
        if (epoch + 1) % max(1, epochs // 4) == 0 or epoch + 1 == epochs:
            log(f"judge epoch {epoch + 1}/{epochs}: loss {total / n:.4f}")
    judge = ImageJudge(model, {"width": width, "resolution": RESOLUTION, "heads": HEADS,
                               "values": {"digit": list(range(10)), **{k: list(v) for k, v in PROPERTIES.items()}},
                               "seed": seed, "epochs": epochs})
    return judge, heldout_accuracy(judge)


def heldout_accuracy(judge: ImageJudge) -> dict:
    """Accuracy of each head on the held-out real digits under all 8 combinations."""
    from pipeline.images import render_all

    images, labels = render_all("heldout", RESOLUTION)
    n, c = images.shape[:2]
    probs = judge.read(images.reshape(n * c, 1, RESOLUTION, RESOLUTION))
    targets = _targets(labels, c)
    acc = {k: float((probs[k].argmax(-1) == targets[k].reshape(-1)).float().mean()) for k in HEADS}
    return {"judge_heldout_accuracy": acc, "judge_heldout_images": n * c}


# ---------------------------------------------------------------------------------------------- scoring


def matches(reading: dict, wanted: dict) -> dict:
    """Per property the caption asks for: does the judge's reading match? Plus `all`."""
    out = {k: reading[k] == v for k, v in wanted.items()}
    out["all"] = all(out.values())
    return out


def score_images(judge: ImageJudge, images, captions: list[str]) -> list[dict]:
    """One row per image: the caption, what the judge read, and which requested properties match."""
    from pipeline.images import parse_caption

    rows = []
    for caption, reading in zip(captions, judge.predict(images)):
        wanted = parse_caption(caption) or {}
        rows.append({"caption": caption, "read": reading, "match": matches(reading, wanted) if wanted else {}})
    return rows


def annotator_score(row: dict) -> tuple:
    """What the simulated annotator ranks by: the digit first, then how many other properties match."""
    m = row["match"]
    return (int(m.get("digit", False)), sum(int(v) for k, v in m.items() if k not in ("digit", "all")))


def annotate_pairs(rows: list[dict], group: list[int], label_noise: float, rng,
                   digit_only: bool = False) -> list[tuple[int, int, bool]]:
    """(chosen, rejected, clean_agrees) index pairs among images of one caption (`group`: their indices): every
    pair whose annotator scores differ, the better one chosen, the label flipped with probability label_noise.
    digit_only: only pairs where one image shows the caption's digit and the other does not."""
    pairs = []
    for a in range(len(group)):
        for b in range(a + 1, len(group)):
            i, j = group[a], group[b]
            si, sj = annotator_score(rows[i]), annotator_score(rows[j])
            if si == sj or digit_only and rows[i]["match"].get("digit") == rows[j]["match"].get("digit"):
                continue
            win, lose = (i, j) if si > sj else (j, i)
            if rng.random() < label_noise:
                pairs.append((lose, win, False))
            else:
                pairs.append((win, lose, True))
    return pairs
