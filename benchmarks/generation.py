"""The eval stage's generation against plain `model.generate` on the same prompts: tokens/s, greedy.

    python benchmarks/generation.py recipes/small.yaml [--model runs/small/sft] [--prompts 400] [--batch 64]

Three ways to answer the first `--prompts` prompts of the recipe's `eval.prompts` with `eval.max_new_tokens` greedy
tokens: pipeline.generation.generate (what the eval stage and PPO's text rollouts call: batches of prompts sorted
longest first, left padding, KV cache), `model.generate` on batches of the same size in the prompts' own order, and
`model.generate` one prompt at a time; with `--vllm` (a CUDA GPU and `pip install '.[vllm]'`) also
pipeline.generation.generate with `generation.backend: vllm`. Tokens/s counts each reply's tokens up to and including
its end-of-turn; all must give the same replies (greedy), which the script checks and prints (vLLM's kernels may
break a near-tie differently).

    python benchmarks/generation.py recipes/small.yaml --model runs/small/sft --vllm     # on a GPU machine
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def plain(model, tokenizer, texts, batch: int, max_new_tokens: int) -> list[list[int]]:
    """model.generate in the given order, `batch` prompts at a time, left padding: each reply up to its eos."""
    import torch

    eos = tokenizer.eos_token_id
    tokenizer.padding_side = "left"
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch):
            enc = tokenizer(texts[start:start + batch], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(model.device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id)
            for row in gen[:, enc["input_ids"].shape[1]:].tolist():
                out.append(row[:row.index(eos) + 1] if eos in row else row)
    return out


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--model", default="runs/small/sft")
    parser.add_argument("--prompts", type=int, default=400)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="time each way this many times; the median counts")
    parser.add_argument("--vllm", action="store_true", help="also generation.backend: vllm (CUDA GPU, vllm)")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import torch

    from pipeline import data, generation, models, threads, vllm_engine
    from pipeline.recipe import load_recipe

    n_threads = threads.configure()
    recipe = load_recipe(args.recipe, args.overrides)
    if args.vllm:
        recipe.generation.backend = "vllm"
        vllm_engine.check(recipe)  # before any work
    keys = recipe.keys("eval")
    rows = data.read_rows(keys.prompts, recipe)[0][:args.prompts]
    prompts = [r["prompt"] for r in rows]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.model).eval().to(device)
    models.configure_generation(model, tokenizer)
    texts = [generation.render_prompt(tokenizer, p) for p in prompts]
    eos, n = tokenizer.eos_token_id, keys.max_new_tokens

    def timed(fn):
        runs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            replies = fn()
            runs.append(time.perf_counter() - start)
        return replies, sorted(runs)[len(runs) // 2]

    def ours(engine=None):
        out = generation.generate(model, tokenizer, prompts, max_new_tokens=n, batch_size=args.batch, progress=False,
                                  engine=engine)
        return [r[0].token_ids + ([eos] if r[0].ended else []) for r in out]

    results = {"pipeline.generation.generate": timed(ours),
               f"model.generate, batches of {args.batch} in order": timed(lambda: plain(model, tokenizer, texts,
                                                                                         args.batch, n)),
               "model.generate, one prompt at a time": timed(lambda: plain(model, tokenizer, texts, 1, n))}
    if args.vllm:
        engine = vllm_engine.EvalEngines(recipe).load(model, tokenizer)
        results["generation.backend: vllm"] = timed(lambda: ours(engine))

    reference = results["pipeline.generation.generate"][0]
    base = results["model.generate, one prompt at a time"]
    print(f"\n{len(prompts)} prompts of {keys.prompts}, {args.model}, greedy, max_new_tokens {n}, "
          f"{n_threads} thread(s), {device}, median of {args.repeats} runs")
    print("| generation | tokens | seconds | tokens/s | x one at a time | same replies as ours |")
    print("|---|---|---|---|---|---|")
    for name, (replies, seconds) in results.items():
        tokens = sum(len(r) for r in replies)
        same = sum(a == b for a, b in zip(replies, reference))
        speed = (tokens / seconds) / (sum(len(r) for r in base[0]) / base[1])
        print(f"| {name} | {tokens} | {seconds:.1f} | {tokens / seconds:.0f} | {speed:.2f} | "
              f"{same} of {len(replies)} |")


if __name__ == "__main__":
    from pipeline.cli import run_main

    run_main(main)  # a bad recipe or --vllm where vLLM cannot run: one line, exit code 2
