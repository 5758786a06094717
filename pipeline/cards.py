"""The model card (README.md) every stage folder gets when it is published: what the stage trained from, on what
data, with which settings, and what it measured, with the Hugging Face card metadata in its YAML header."""

from __future__ import annotations

from pathlib import Path

import yaml

HEADLINE_LIMIT = 14  # numbers shown; metrics.json has all of them


def _headline(metrics: dict) -> list[tuple[str, object]]:
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return rows[:HEADLINE_LIMIT]


def write(folder: Path, *, stage: str, run: str, recipe_path: str, section: dict, inputs: dict, data: dict,
          metrics: dict) -> None:
    checkpoints = []
    for name, value in inputs.get("checkpoints", {}).items():
        for cp in value if isinstance(value, list) else [value]:
            checkpoints.append((name, cp))
    hub_bases = [cp["path"] for _, cp in checkpoints if cp.get("source") == "hub"]
    diffusers = (Path(folder) / "model_index.json").is_file()  # an image stage's pipeline folder
    meta = {"library_name": "diffusers" if diffusers else "transformers", "tags": ["alignment-pipeline", stage],
            **({"pipeline_tag": "text-to-image"} if diffusers else {})}
    if hub_bases:
        meta["base_model"] = hub_bases[0]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# `{stage}` of run `{run}`", "",
             f"Trained by the alignment pipeline's `{stage}` stage from the recipe `{recipe_path}` "
             f"(`manifest.json` has every resolved setting, library versions and timings; `metrics.json` every "
             f"figure; `log.txt` the stage's log).", ""]
    if checkpoints:
        lines += ["## Started from", ""]
        lines += [f"- `{name}`: {cp.get('ref') or 'model'} ({cp.get('source')}"
                  + (f", `{cp['path']}`" if cp.get("path") and cp.get("source") != "config" else
                     ", a new model built from `model.config`" if cp.get("source") == "config" else "") + ")"
                  for name, cp in checkpoints]
        lines.append("")
    specs = inputs.get("data", {})
    if specs:
        lines += ["## Data", ""]
        for name, d in specs.items():
            read = data.get(name, {})
            size = f"{read['pairs']} pairs" if "pairs" in read else f"{read['rows']} rows" if "rows" in read else ""
            lines.append(f"- `{name}`: `{d['spec']}`" + (f", format {read['format']}" if read.get("format") else "")
                         + (f", {size}" if size else ""))
        lines.append("")
    lines += ["## Settings (the recipe's section)", "", "```yaml",
              (yaml.safe_dump({stage: section}, sort_keys=False).strip() if section else f"{stage}: {{}}"),
              "```", ""]
    headline = _headline(metrics)
    if headline:
        lines += ["## Results", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in headline]
        lines.append("")
    (Path(folder) / "README.md").write_text("\n".join(lines), encoding="utf-8")
