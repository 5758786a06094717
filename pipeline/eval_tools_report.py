"""What the eval stage writes about tool use (pipeline/eval_tools.py): the tool prompts' lines of samples.jsonl,
report.md's "Tool use" section, tool_images.png (the image each checkpoint drew for a few held-out draw prompts,
side by side) and the summary lines."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from pipeline import log
from pipeline.eval_tools import DRAW_KINDS

GRID_ROWS = 6  # draw prompts in tool_images.png: the first ones of the file


def prompt_text(row) -> str:
    prompt = row["prompt"]
    if isinstance(prompt, str):
        return prompt
    return next((m.get("content") or "" for m in reversed(prompt) if m["role"] == "user"), "")


def call_record(result, tools, name: str) -> dict:
    """A call of checkpoint `name` as samples.jsonl keeps it; an image it made or read with its PNG's path (relative
    to the run folder)."""
    out = {k: getattr(result, k) for k in ("name", "arguments", "valid", "ok", "error", "content")}
    if result.image and tools.image(name, result.image) is not None:
        out.update(image=result.image, image_path=tools.image_path(name, result.image))
    return out


def rollout_record(rollout: dict, tools, name: str) -> dict:
    calls = [call_record(r, tools, name) for r in rollout["calls"]]
    images = list(dict.fromkeys(c["image"] for c in calls if "image" in c))
    return {"turns": rollout["turns"], "final": rollout["final"], "ended": rollout["ended"], "calls": calls,
            "images": images, "image_paths": [tools.image_path(name, i) for i in images]}


def write_samples(path: Path, tools) -> None:
    """Append one line per tool prompt to samples.jsonl (after the text prompts' lines): `"task": "tool"`, the
    prompt and its task, and per checkpoint the greedy rollout (turns, calls, images, final answer), its verdict
    and its sampled rollouts with their log-ratio to the reference."""
    with open(path, "a", encoding="utf-8") as f:
        for i, row in enumerate(tools.rows):
            replies = {}
            for name, run in tools.runs.items():
                entry = rollout_record(run.greedy[i], tools, name)
                if run.verdicts[i] is not None:
                    entry["verdict"] = run.verdicts[i]
                if run.samples is not None:
                    entry["samples"] = [{**rollout_record(s, tools, name), "log_ratio": round(s["log_ratio"], 4)}
                                        for s in run.samples[i]]
                replies[name] = entry
            head = {k: row[k] for k in ("id", "kind", "hard", "prompt", "expect") if row.get(k) is not None}
            f.write(json.dumps({"task": "tool", **head, "replies": replies}, ensure_ascii=False, default=str) + "\n")


def write_outputs(out: Path, tools, metrics: dict, names: list[str], reference: str | None) -> list[str]:
    """metrics.json's `tool_prompts`, the tool lines of samples.jsonl (after the text prompts' lines) and
    tool_images.png; returns report.md's "Tool use" lines. `metrics["checkpoints"][name]["tools"]` is there."""
    reference = reference if tools.keys.tool_samples else None
    metrics["tool_prompts"] = tools.summary(reference)
    write_samples(out / "samples.jsonl", tools)
    grid = draw_grid(out / "tool_images.png", tools, names)
    return report_lines(tools, {n: metrics["checkpoints"][n]["tools"] for n in names}, names, reference, grid)


# ---------------------------------------------------------------------------------------------- report


def _fmt(value, ci=None, digits=2, signed=False) -> str:
    if value is None:
        return "—"
    f = f"+.{digits}f" if signed else f".{digits}f"
    return format(value, f) + (f" [{format(ci[0], f)}, {format(ci[1], f)}]" if ci else "")


def report_lines(tools, per: dict, names: list[str], reference: str | None, grid: bool) -> list[str]:
    """report.md's "Tool use": the settings, one row per checkpoint, the image grid. `per`: name -> tools block."""
    keys, summary = tools.keys, tools.summary(reference)
    kinds = list(summary["kinds"])
    lines = ["## Tool use", "",
             f"- prompts: `{summary['spec']}` ({summary['n']}; {summary['verified']} world tasks"
             + (": " + ", ".join(f"{k} {n}" for k, n in summary["kinds"].items()) if kinds else "") + "); tools: "
             + ", ".join(f"`{t}`" for t in summary["tools"]),
             f"- one greedy rollout per prompt: at most {keys.max_tool_calls} calls (a call past them is not run and "
             f"not counted as a call), {keys.tool_max_new_tokens} tokens per assistant turn, "
             f"{keys.tool_max_total_tokens} per reply (tool results included)",
             "- call rate: share of prompts with a call; valid: calls that parsed and fit the tool's schema; "
             "execution errors: valid calls whose tool failed or timed out"]
    if kinds:
        lines.append("- correct: a draw task when the image judge"
                     + (f" (`{summary['judge']}`)" if summary["judge"] else "") + " reads every property asked for "
                     "in the last image drawn; a read task when the final answer is the image's digit (whether or "
                     "not it looked); bootstrap 95% intervals over prompts")
    gain_vs = next((m["gain_vs"] for m in per.values() if "gain_vs" in m), None)
    if gain_vs:
        lines.append(f"- gain over `{gain_vs}`: correct minus `{gain_vs}`'s correct on the same prompts; the "
                     f"interval bootstraps the per-prompt differences (paired)")
    if reference and keys.tool_samples:
        lines.append(f"- KL to `{reference}`: {keys.tool_samples} rollout(s) per prompt sampled at temperature 1 "
                     f"(tools run), log-probs summed over the tokens the policy chose (tool results are context, "
                     f"never counted); mean per prompt, bootstrap over prompts")
    else:
        lines.append("- KL: not measured (" + ("tool_samples: 0" if reference else "no reference") + ")")
    columns = [("call rate", lambda m: _fmt(m["call_rate"])), ("valid", lambda m: _fmt(m.get("valid_rate"))),
               ("execution errors", lambda m: f"{m['execution_errors']} of {m['valid_calls']}"),
               ("calls / prompt", lambda m: _fmt(m["calls_per_prompt"]))]
    if kinds:
        columns.append(("correct", lambda m: _fmt(m.get("correct"), m.get("correct_ci"))))
        columns += [(k, (lambda k: lambda m: _fmt((c := m["correct_per_kind"].get(k)) and c["mean"],
                                                   c and c["ci"]))(k)) for k in kinds]
    if gain_vs:
        columns.append((f"gain over `{gain_vs}`", lambda m: _fmt(m.get("gain"), m.get("gain_ci"), signed=True)))
    if reference and keys.tool_samples:
        columns.append((f"KL to `{reference}`", lambda m: _fmt(m.get("kl"), m.get("kl_ci"))))
    lines += ["", "| checkpoint | " + " | ".join(c for c, _ in columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| `{name}` | " + " | ".join(get(per[name]) for _, get in columns) + " |" for name in names]
    lines.append("")
    if grid:
        lines += [f"The image each checkpoint drew (greedy) for the first {GRID_ROWS} draw prompts, a column per "
                  "checkpoint: a green frame when the judge finds every property asked for, red when not, grey "
                  "for a prompt that is not a world task; a crossed cell: no image drawn.", "",
                  "![tool_images](tool_images.png)", ""]
    lines.append("Every rollout (turns, calls, images, verdict) is in samples.jsonl (`\"task\": \"tool\"`).")
    return lines + [""]


def log_summary(per: dict) -> None:
    for name, m in per.items():
        parts = [f"calls in {m['call_rate']:.2f} of tool prompts", f"valid {_fmt(m.get('valid_rate'))}",
                 f"execution errors {m['execution_errors']}"]
        if "correct" in m:
            parts.append(f"correct {_fmt(m['correct'], m['correct_ci'])}")
        if "gain" in m:
            parts.append(f"gain over {m['gain_vs']} {_fmt(m['gain'], m['gain_ci'], signed=True)}")
        if "kl" in m:
            parts.append(f"KL {m['kl']:.2f}")
        log.info(f"{name} (tools): " + ", ".join(parts))


# ---------------------------------------------------------------------------------------------- image grid


def _short(text: str, chars: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= chars else text[:chars - 1] + "…"


def draw_grid(path: Path, tools, names: list[str]) -> bool:
    """tool_images.png: rows the first GRID_ROWS draw prompts (world draw / draw_sum tasks; without any, prompts
    where a checkpoint drew), columns the checkpoints. False (nothing written) when there is no such prompt."""
    from PIL import Image, ImageDraw

    rows = tools.rows
    picks = [i for i, row in enumerate(rows) if row.get("kind") in DRAW_KINDS][:GRID_ROWS]
    if not picks:
        picks = [i for i in range(len(rows)) if any(tools.drawn_image(n, i) for n in names)][:GRID_ROWS]
    if not picks:
        return False
    cells = {(r, c): tools.drawn_image(name, i) for r, i in enumerate(picks) for c, name in enumerate(names)}
    res = max([tools.image(names[c], x).shape[-1] for (_, c), x in cells.items() if x] or [16])
    side = res * max(1, 64 // res)
    cell_w, cell_h, label_w, head = max(side, 110) + 8, side + 10, 250, 22
    canvas = Image.new("RGB", (label_w + len(names) * cell_w, head + len(picks) * cell_h), (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    light, grey = (230, 230, 230), (130, 130, 130)
    for c, name in enumerate(names):
        draw.text((label_w + c * cell_w + 4, 6), _short(name, cell_w // 6), fill=light)
    for r, i in enumerate(picks):
        y0 = head + r * cell_h + 5
        label = textwrap.wrap(" ".join(prompt_text(rows[i]).split()), label_w // 6 - 1)[:side // 12]
        draw.multiline_text((4, y0 + side // 2 - 6 * len(label)), "\n".join(label), fill=light)
        for c, name in enumerate(names):
            x0 = label_w + c * cell_w + (cell_w - side) // 2
            box = [x0, y0, x0 + side - 1, y0 + side - 1]
            image_id, verdict = cells[r, c], tools.runs[name].verdicts[i]
            if image_id is None:
                draw.rectangle(box, outline=grey)
                draw.line(box, fill=grey)
                draw.line([box[0], box[3], box[2], box[1]], fill=grey)
                continue
            image = tools.image(name, image_id)
            pixels = (image * 255).round().byte().permute(1, 2, 0).numpy()
            tile = Image.fromarray(pixels[..., 0] if len(image) == 1 else pixels).convert("RGB")
            canvas.paste(tile.resize((side, side), Image.NEAREST), (x0, y0))
            colour = grey if verdict is None else (60, 200, 60) if verdict["correct"] else (220, 60, 60)
            draw.rectangle([x0 - 3, y0 - 3, x0 + side + 2, y0 + side + 2], outline=colour, width=2)
    canvas.save(path)
    return True
