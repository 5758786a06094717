"""Evaluation of a text-to-image model on held-out captions, shared by the image stages.

Every held-out caption is drawn `heldout_samples` times through the saved pipeline's own `__call__` (its sampler,
classifier-free guidance, fixed seeds). The image judge reads every image; for the digit, each property the
caption asks for, and all of them together, the share of images that match comes with a 95% bootstrap interval
over images. Diversity is the mean pairwise RMS pixel distance among the samples of one caption, averaged over
captions, beside the same figure for real held-out digits drawn under the same captions. Written: `samples/`
(one PNG strip and the judge's readings per caption), `grid.png`, and the figures for metrics.json / report.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pipeline.cli import PipelineError

MEASURES = ("digit", "size", "thickness", "position", "all")


PAIR_COLUMNS = ("jpg_0", "jpg_1", "label_0", "chosen", "rejected")  # Pick-a-Pic's and Diffusion-DPO's pair columns


def file_part(caption: str) -> str:
    """A caption as part of a file name: words joined by _, a character a file name cannot hold (a / in "w/ thick
    strokes") as _, at most 80 characters."""
    return re.sub(r"[^\w.,+=-]", "_", caption.replace(" ", "_"), flags=re.UNICODE)[:80].strip(".") or "caption"


def read_captions(spec: str | None, recipe) -> list[str]:
    """Held-out captions: the world's (`images:digits`), or `caption` rows of a .jsonl / .txt file."""
    return [text for _, text in caption_rows(spec, recipe)]


def caption_rows(spec: str | None, recipe, judged: bool = True) -> list[tuple[str, str]]:
    """read_captions' captions with where each came from ("FILE: line N"), for messages about one of them.
    `judged`: the image judge scores them, so each must name one digit; otherwise any caption is drawn."""
    from pipeline import files, images

    if not spec:
        return []
    if spec == images.WORLD_SPEC:
        return [(spec, text) for text in images.heldout_captions()]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise PipelineError(f"captions '{spec}': not found (expected {images.WORLD_SPEC} or a .jsonl / .txt file)")
    got, where = files.txt_rows(files.text_of(path), "line") if path.suffix == ".txt" else files.read_jsonl(path)
    for row, w in zip(got, where):  # a preference set (Pick-a-Pic's layout) was read as its captions alone
        if any(k in row for k in PAIR_COLUMNS):
            raise PipelineError(f"{path}: {w}: a preference pair ({', '.join(k for k in PAIR_COLUMNS if k in row)}): "
                                f"this key takes captions; image preference pairs go in diffusion_dpo's `dataset` "
                                f"or `eval_dataset` (README: Image models)")
    rows = [(w, r.get("caption", r.get("text"))) for r, w in zip(got, where)]
    out = []
    for where, text in rows:
        if not isinstance(text, str) or not text.strip():
            raise PipelineError(f"{path}: {where}: missing caption (a non-empty 'caption' or 'text')")
        if judged and images.parse_caption(text) is None:
            raise PipelineError(f"{path}: {where}: caption '{text}' names no single digit, so the judge cannot "
                                f"score it")
        out.append((f"{path}: {where}", text.strip()))
    if not out:
        raise PipelineError(f"{path}: no captions")
    return out


def diversity(images, groups: list[list[int]]) -> float | None:
    """Mean pairwise RMS distance between images of the same group, averaged over groups."""
    import torch

    values = []
    for g in groups:
        if len(g) < 2:
            continue
        x = images[g].flatten(1).float()
        d = torch.cdist(x, x) / x.shape[1] ** 0.5
        n = len(g)
        values.append(float(d.sum() / (n * (n - 1))))
    return sum(values) / len(values) if values else None


def real_diversity(captions: list[str], per_caption: int) -> float | None:
    """The same figure for real held-out digits drawn under each (full world) caption: a reference point."""
    import torch

    from pipeline import images

    base, labels = images.real_digits("heldout")
    groups, stack, offset = [], [], 0
    for text in captions:
        want = images.parse_caption(text)
        if want is None or any(p not in want for p in images.PROPERTIES):
            continue
        idx = (labels == want["digit"]).nonzero()[:per_caption, 0]
        drawn = images.render(base[idx], want["size"], want["thickness"], want["position"])
        groups.append(list(range(offset, offset + len(idx))))
        offset += len(idx)
        stack.append(drawn)
    return diversity(torch.cat(stack), groups) if stack else None


RECORD = "evaluation.json"  # beside samples/<name>/readings.jsonl: the settings that drew them, for reuse


def draw(pipe, captions: list[str], out: Path, *, samples: int, steps: int, guidance: float, seed: int,
         columns: int, name: str):
    """Draw every caption `samples` times (fixed seeds); writes out/samples/<name>/ (a PNG strip per caption) and
    out/grid_<name>.png (grid.png for `model`): the held-out images, with or without a judge to read them."""
    from pipeline import images

    expanded = [c for c in captions for _ in range(samples)]
    drawn = images.generate(pipe, expanded, steps=steps, guidance=guidance, seed=seed, desc=f"held-out {name}")
    folder = out / "samples" / name
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(captions):
        images.save_grid(folder / f"{i:02d}_{file_part(text)}.png", drawn[i * samples:(i + 1) * samples], [text],
                         per_row=samples)
    keep = min(columns, samples)
    grid_idx = [i * samples + j for i in range(len(captions)) for j in range(keep)]
    images.save_grid(out / ("grid.png" if name == "model" else f"grid_{name}.png"), drawn[grid_idx], captions,
                     per_row=keep)
    return drawn


def evaluate(pipe, judge, captions: list[str], out: Path, *, samples: int, steps: int, guidance: float, seed: int,
             columns: int, name: str, n_boot: int = 1000) -> dict:
    """Draw (draw()), judge and summarise; the judge's readings go to out/samples/<name>/readings.jsonl.
    The result's `matches` (per image, for paired comparisons) is for the caller to drop before saving."""
    from pipeline.image_judge import score_images

    drawn = draw(pipe, captions, out, samples=samples, steps=steps, guidance=guidance, seed=seed, columns=columns,
                 name=name)
    rows = score_images(judge, drawn, [c for c in captions for _ in range(samples)])
    groups = [list(range(i * samples, (i + 1) * samples)) for i in range(len(captions))]
    spread = diversity(drawn, groups)
    folder = out / "samples" / name
    with open(folder / "readings.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    settings = _settings(captions, samples, steps, guidance, seed, columns)
    (folder / RECORD).write_text(json.dumps({"settings": settings, "diversity": spread}, indent=1))
    return _summary(rows, captions, samples, seed, n_boot, spread)


def recorded(stage_dir: Path, judge_dir: Path, captions: list[str], out: Path, *, samples: int, steps: int,
             guidance: float, seed: int, columns: int, name: str, n_boot: int = 1000) -> dict | None:
    """evaluate()'s result for the model of a finished image stage folder, from what that stage drew and its own
    judge read (samples/model/) with these same settings, copied to out/samples/<name>/ and out/grid_<name>.png;
    None where it evaluated otherwise or not at all. A tuning stage's start model is its init stage's model: drawing
    it again would repeat that stage's evaluation."""
    import shutil

    folder = Path(stage_dir) / "samples" / "model"
    settings = _settings(captions, samples, steps, guidance, seed, columns)
    try:
        record = json.loads((folder / RECORD).read_text())
        rows = [json.loads(line) for line in (folder / "readings.jsonl").read_text().splitlines()]
    except (OSError, ValueError):
        return None
    if (record.get("settings") != settings or [r.get("caption") for r in rows] != [c for c in captions
                                                                                  for _ in range(samples)]
            or Path(judge_dir).resolve() != (Path(stage_dir) / "judge").resolve()):
        return None
    shutil.copytree(folder, out / "samples" / name, dirs_exist_ok=True)
    shutil.copyfile(Path(stage_dir) / "grid.png", out / f"grid_{name}.png")
    return _summary(rows, captions, samples, seed, n_boot, record["diversity"])


def _settings(captions: list[str], samples: int, steps: int, guidance: float, seed: int, columns: int) -> dict:
    """What decides the held-out images and grid (evaluation.json's `settings`)."""
    return {"captions": captions, "samples": samples, "steps": steps, "guidance": guidance, "seed": seed,
            "columns": columns}


def _summary(rows: list[dict], captions: list[str], samples: int, seed: int, n_boot: int, spread) -> dict:
    """The figures of the judge's readings of `samples` images per caption, in caption order."""
    from pipeline.metrics import mean_ci

    result = {}
    for m in MEASURES:
        values = [float(r["match"][m]) for r in rows if m in r["match"]]
        result[m] = mean_ci(values, n_boot=n_boot, seed=seed)
    per_caption = {}
    for i, text in enumerate(captions):
        chunk = rows[i * samples:(i + 1) * samples]
        per_caption[text] = {m: sum(r["match"][m] for r in chunk if m in r["match"]) / max(1, len(chunk))
                             for m in MEASURES if any(m in r["match"] for r in chunk)}
    return {"accuracy": result, "per_caption": per_caption, "diversity": spread,
            "images": len(rows), "captions": len(captions),
            "matches": {m: [float(r["match"][m]) if m in r["match"] else None for r in rows] for m in MEASURES}}


def paired_gain(start: dict, tuned: dict, seed: int = 0, n_boot: int = 1000) -> dict:
    """Per measure: mean of (tuned − start) over images drawn for the same caption with the same seed, 95% CI."""
    from pipeline.metrics import mean_ci

    out = {}
    for m in MEASURES:
        diffs = [b - a for a, b in zip(start["matches"][m], tuned["matches"][m]) if a is not None and b is not None]
        out[m] = mean_ci(diffs, n_boot=n_boot, seed=seed)
    return out


def fmt(ci: dict | None) -> str:
    if not ci:
        return "—"
    return f"{ci['mean']:.3f} [{ci['ci'][0]:.3f}, {ci['ci'][1]:.3f}]"


def report(title: str, metrics: dict, evals: dict[str, dict], notes: list[str]) -> str:
    """report.md: judge accuracy on real images, then each evaluated model on the held-out captions."""
    lines = [f"# {title}", ""]
    judge = metrics.get("judge_heldout_accuracy")
    if judge:
        lines += [f"Image judge on {metrics.get('judge_heldout_images')} held-out real images (never trained on): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in judge.items()), ""]
    if evals:
        first = next(iter(evals.values()))
        lines += [f"Held-out captions: {first['captions']} (disjoint from training captions), "
                  f"{first['images'] // max(1, first['captions'])} images each, read by the judge. "
                  "Share of images matching their caption, 95% bootstrap interval:", "",
                  "| model | " + " | ".join(MEASURES) + " | diversity |", "|---" * (len(MEASURES) + 2) + "|"]
        for name, ev in evals.items():
            div = ev.get("diversity")
            lines.append(f"| {name} | " + " | ".join(fmt(ev["accuracy"].get(m)) for m in MEASURES)
                         + (f" | {div:.3f} |" if div is not None else " | — |"))
        if metrics.get("real_diversity") is not None:
            lines += ["", f"Diversity is the mean pairwise RMS pixel distance among samples of one caption; real "
                          f"held-out digits under the same captions: {metrics['real_diversity']:.3f}."]
        lines += ["", "![samples](grid.png)", "", "Per caption (share matching all requested properties):", ""]
        for name, ev in evals.items():
            lines.append(f"- {name}: " + "; ".join(f"{c}: {v.get('all', 0):.2f}" for c, v in ev["per_caption"].items()))
    lines += ["", *notes]
    return "\n".join(lines) + "\n"
