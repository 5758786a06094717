"""How many sampler steps the image tool needs: held-out image accuracy and time at several step counts.

    python benchmarks/draw_steps.py recipes/small.yaml [--model diffusion_dpo] [--steps 100,50,25] [--samples 10]

Draws every held-out caption of the recipe's `diffusion_dpo` section `--samples` times with the run's `--model`
stage (the pipeline the `draw_image` tool loads), at each step count with the same seeds, and has the `diffusion`
stage's judge read them (pipeline/image_eval.py, as the image stages evaluate themselves). Prints per step count the
seconds, digit and all-properties accuracy with 95% intervals, and the paired difference from the first count.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--model", default="diffusion_dpo", help="the stage whose pipeline draws")
    parser.add_argument("--judge", default="diffusion", help="the stage whose judge/ reads the images")
    parser.add_argument("--steps", default="100,50,25")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from pipeline import image_eval, images, threads
    from pipeline.image_judge import ImageJudge
    from pipeline.recipe import load_recipe

    print(f"CPU threads: {threads.configure()}")
    recipe = load_recipe(args.recipe, args.overrides)
    captions = image_eval.read_captions(recipe.keys("diffusion_dpo").heldout_captions, recipe)
    pipe = images.load_pipeline(str(recipe.stage_dir(args.model)))
    judge = ImageJudge.load(recipe.stage_dir(args.judge) / "judge")
    out = Path(tempfile.mkdtemp(prefix="draw-steps-"))
    counts = [int(s) for s in args.steps.split(",")]
    evals, seconds = {}, {}
    for steps in counts:
        start = time.perf_counter()
        evals[steps] = image_eval.evaluate(pipe, judge, captions, out, samples=args.samples, steps=steps,
                                           guidance=1.0, seed=args.seed, columns=4, name=f"steps{steps}")
        seconds[steps] = time.perf_counter() - start

    def cell(ci):
        return f"{ci['mean']:+.3f} [{ci['ci'][0]:+.3f}, {ci['ci'][1]:+.3f}]"

    print(f"\n{args.model} on {len(captions)} held-out captions x {args.samples} images, judged by {args.judge}/judge; "
          f"sampler {type(pipe.scheduler).__name__}, guidance 1; paired differences against {counts[0]} steps")
    print("| steps | seconds | digit | all properties | digit - first | all - first |")
    print("|---|---|---|---|---|---|")
    for steps in counts:
        acc = evals[steps]["accuracy"]
        gain = image_eval.paired_gain(evals[counts[0]], evals[steps], seed=args.seed)
        print(f"| {steps} | {seconds[steps]:.1f} | {image_eval.fmt(acc['digit'])} | {image_eval.fmt(acc['all'])} | "
              f"{cell(gain['digit'])} | {cell(gain['all'])} |")


if __name__ == "__main__":
    main()
