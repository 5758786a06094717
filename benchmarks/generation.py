"""The eval stage's generation and PPO's rollouts against plain `model.generate` on the same prompts: tokens/s.

    python benchmarks/generation.py recipes/small.yaml [--model runs/small/sft] [--prompts 400] [--batch 64]
    python benchmarks/generation.py recipes/small.yaml --model runs/small/sft --vllm     # on a GPU machine

Eval, greedy: three ways to answer the first `--prompts` prompts of the recipe's `eval.prompts` with
`eval.max_new_tokens` tokens: pipeline.generation.generate (what the eval stage calls: batches of prompts sorted
longest first, left padding, KV cache), `model.generate` on batches of the same size in the prompts' own order, and
`model.generate` one prompt at a time; with `--vllm` (a CUDA GPU and `pip install '.[vllm]'`) also
pipeline.generation.generate with `generation.backend: vllm`. All must give the same replies (greedy), which the
script checks and prints (vLLM's kernels may break a near-tie differently).

PPO, sampled: the first `--ppo-prompts` of PPO's text prompts (`world:preference`, rendered and cut at
`ppo.max_prompt_length` as the ppo stage does) answered with `ppo.max_new_tokens` tokens at `ppo.temperature` /
`ppo.top_p`, `ppo.batch_size` prompts a rollout: pipeline.ppo_rollout.sample_replies (our PPO's text rollouts: one
left-padded batch per step, KV cache, the replies masked after their end-of-turn), `model.generate` on the same
batches, and `model.generate` one prompt at a time (samples differ between ways, so only the speed is compared;
`--vllm` adds sample_replies through vLLM). Tool rollouts are not here: their time is mostly the tools
(ppo_phases.py). Tokens/s counts each reply's tokens up to and including its end-of-turn.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def plain(model, tokenizer, texts, batch: int, max_new_tokens: int, **sampling) -> list[list[int]]:
    """model.generate in the given order, `batch` prompts at a time, left padding: each reply up to its eos."""
    import torch

    eos = tokenizer.eos_token_id
    tokenizer.padding_side = "left"
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch):
            enc = tokenizer(texts[start:start + batch], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(model.device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id, **(sampling or {"do_sample": False}))
            for row in gen[:, enc["input_ids"].shape[1]:].tolist():
                out.append(row[:row.index(eos) + 1] if eos in row else row)
    return out


def table(results: dict, base_name: str, same_as: str | None) -> None:
    base = results[base_name]
    base_rate = sum(len(r) for r in base[0]) / base[1]
    header = "| generation | tokens | seconds | tokens/s | x one at a time |"
    print(header + (" same replies as ours |" if same_as else ""))
    print("|---|---|---|---|---|" + ("---|" if same_as else ""))
    for name, (replies, seconds) in results.items():
        tokens = sum(len(r) for r in replies)
        same = ""
        if same_as:
            same = f" {sum(a == b for a, b in zip(replies, results[same_as][0]))} of {len(replies)} |"
        print(f"| {name} | {tokens} | {seconds:.1f} | {tokens / seconds:.0f} | {tokens / seconds / base_rate:.2f} |"
              + same)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--model", default="runs/small/sft")
    parser.add_argument("--prompts", type=int, default=400, help="eval prompts (0: no eval table)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--ppo-prompts", type=int, default=256, help="PPO text prompts (0: no PPO table)")
    parser.add_argument("--repeats", type=int, default=5, help="time each way this many times; the median counts")
    parser.add_argument("--vllm", action="store_true", help="also generation.backend: vllm (CUDA GPU, vllm)")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline import data, generation, models, ppo_rollout, threads, vllm_engine
    from pipeline.cli import PipelineError
    from pipeline.recipe import load_recipe

    n_threads = threads.configure()
    recipe = load_recipe(args.recipe, args.overrides)
    if args.vllm:
        recipe.generation.backend = "vllm"
        vllm_engine.check(recipe)  # before any work
    if not Path(args.model).is_dir():
        raise PipelineError(f"--model {args.model}: no such model folder (train it first: make run)")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.model).eval().to(device)
    models.configure_generation(model, tokenizer)
    with torch.no_grad():  # untimed: the first way timed must not pay for the device's start (CUDA context, kernels)
        model.generate(**tokenizer(["warm up"], return_tensors="pt", add_special_tokens=False).to(device),
                       max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    engine = vllm_engine.EvalEngines(recipe).load(model, tokenizer) if args.vllm else None
    eos = tokenizer.eos_token_id

    def timed(fn):
        runs = []
        for repeat in range(args.repeats):
            torch.manual_seed(repeat)
            start = time.perf_counter()
            replies = fn()
            runs.append(time.perf_counter() - start)
        return replies, sorted(runs)[len(runs) // 2]

    if args.prompts:
        keys = recipe.keys("eval")
        prompts = [r["prompt"] for r in data.read_rows(keys.prompts, recipe)[0][:args.prompts]]
        texts = [generation.render_prompt(tokenizer, p) for p in prompts]
        n = keys.max_new_tokens

        def ours(with_engine=None):
            out = generation.generate(model, tokenizer, prompts, max_new_tokens=n, batch_size=args.batch,
                                      progress=False, engine=with_engine)
            return [r[0].token_ids + ([eos] if r[0].ended else []) for r in out]

        results = {"pipeline.generation.generate": timed(ours),
                   f"model.generate, batches of {args.batch} in order": timed(
                       lambda: plain(model, tokenizer, texts, args.batch, n)),
                   "model.generate, one prompt at a time": timed(lambda: plain(model, tokenizer, texts, 1, n))}
        if engine is not None:
            results["generation.backend: vllm"] = timed(lambda: ours(engine))
        print(f"\neval: {len(prompts)} prompts of {keys.prompts}, {args.model}, greedy, max_new_tokens {n}, "
              f"{n_threads} thread(s), {device}, median of {args.repeats} runs")
        table(results, "model.generate, one prompt at a time", "pipeline.generation.generate")

    if args.ppo_prompts:
        cfg = recipe.trainer_config("ppo")
        rows = data.read_rows("world:preference", recipe)[0]
        texts = [generation.render_prompt(tokenizer, r["prompt"]) for r in rows]
        kept = [(t, x) for t, x in zip(texts, tokenizer(texts, add_special_tokens=False)["input_ids"])
                if len(x) <= cfg.max_prompt_length][:args.ppo_prompts]
        texts, ids = [t for t, _ in kept], [x for _, x in kept]
        b, n = cfg.batch_size, cfg.max_new_tokens
        sampling = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": 0}

        def rollouts(with_engine=None):
            out = []
            for start in range(0, len(ids), b):
                batch = ppo_rollout.sample_replies(model, tokenizer, ids[start:start + b], [], cfg, device,
                                                   engine=with_engine)
                out += [row[:int(m.sum())] for row, m in zip(batch.replies.tolist(), batch.mask)]
            return out

        results = {"ppo_rollout.sample_replies": timed(rollouts),
                   f"model.generate, the same batches of {b}": timed(
                       lambda: plain(model, tokenizer, texts, b, n, **sampling)),
                   "model.generate, one prompt at a time": timed(
                       lambda: plain(model, tokenizer, texts, 1, n, **sampling))}
        if engine is not None:
            results["sample_replies, generation.backend: vllm"] = timed(lambda: rollouts(engine))
        print(f"\nppo rollouts: {len(ids)} text prompts of world:preference, {args.model}, sampled (temperature "
              f"{cfg.temperature}, top_p {cfg.top_p}), max_new_tokens {n}, {n_threads} thread(s), {device}, "
              f"median of {args.repeats} runs")
        table(results, "model.generate, one prompt at a time", None)


if __name__ == "__main__":
    from pipeline.cli import run_main

    run_main(main)  # a bad recipe or --vllm where vLLM cannot run: one line, exit code 2
