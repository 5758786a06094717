"""Diffusion-DPO variants in a short loop (the experiment behind README "The small recipe's image stages"; not a stage).

    python benchmarks/diffusion_dpo_variants.py --name v1 --start runs/small/diffusion --tmax 500 --anchor both

Draws 16 DDPM-100 candidates per training caption once (cached under --work), labels pairs with the simulated
annotator, trains the UNet with the Diffusion-DPO loss plus the chosen anchor, and prints the paired gains on
training and held-out captions against the start model (same seeds as the stage)."""
import argparse, json, random, sys, time, copy
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch, torch.nn.functional as F
from pipeline import images, image_eval, diffusion_train
from pipeline.image_judge import ImageJudge, score_images, annotate_pairs

p = argparse.ArgumentParser()
p.add_argument("--name", required=True)
p.add_argument("--start", default="runs/small/diffusion")
p.add_argument("--work", default="/tmp/ddpo")
p.add_argument("--k", type=int, default=16)
p.add_argument("--use_k", type=int, default=16)
p.add_argument("--tmin", type=int, default=0)
p.add_argument("--tmax", type=int, default=1000)
p.add_argument("--anchor", default="winner")  # winner | both | none
p.add_argument("--anchor_w", type=float, default=1.0)
p.add_argument("--dpop", type=float, default=0.0)
p.add_argument("--lr", type=float, default=1e-5)
p.add_argument("--steps", type=int, default=200)
p.add_argument("--batch", type=int, default=16)
p.add_argument("--beta", type=float, default=2000.0)
p.add_argument("--digit_only", action="store_true")
p.add_argument("--noise", type=float, default=0.15)
p.add_argument("--eval_only", action="store_true")
a = p.parse_args()
out = Path(a.work) / a.name; out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
judge = ImageJudge.load(Path(a.start) / "judge")
pipe = images.load_pipeline(a.start); pipe.set_progress_bar_config(disable=True)
train_caps = [images.caption(*c) for c in images.train_combos()]
held = images.heldout_captions()

def evals(p, tag):
    cache = Path(a.work) / f"eval_{tag}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    r = {}
    for split, caps, n, seed in (("train", train_caps, 4, 7), ("held", held, 10, 0)):
        e = image_eval.evaluate(p, judge, caps, out, samples=n, steps=100, guidance=1.0, seed=seed, columns=10, name=f"{tag}_{split}")
        r[split] = {"acc": {m: e["accuracy"][m]["mean"] for m in ("digit", "all")}, "matches": e["matches"]}
    cache.write_text(json.dumps(r))
    return r

# candidates, cached
cand = Path(a.work) / f"cand_k{a.k}.safetensors"
from safetensors.torch import load_file, save_file
if cand.is_file():
    drawn, expanded = load_file(str(cand))["drawn"], json.loads(cand.with_suffix(".json").read_text())
else:
    expanded = [c for c in train_caps for _ in range(a.k)]
    t0 = time.time()
    drawn = images.generate(pipe, expanded, steps=100, guidance=1.0, seed=1)
    save_file({"drawn": drawn.contiguous()}, str(cand)); cand.with_suffix(".json").write_text(json.dumps(expanded)); print("candidates", time.time() - t0, flush=True)
rows = score_images(judge, drawn, expanded)
rng = random.Random(0)
pairs = []
for g in range(len(train_caps)):
    group = list(range(g * a.k, g * a.k + a.use_k))
    for w, l, clean in annotate_pairs(rows, group, a.noise, rng):
        if a.digit_only and rows[w]["match"]["digit"] == rows[l]["match"]["digit"]:
            continue
        pairs.append((w, l, clean))
print(f"pairs {len(pairs)} clean {sum(p[2] for p in pairs)/len(pairs):.3f} cand digit {sum(r['match']['digit'] for r in rows)/len(rows):.3f}", flush=True)
chosen = drawn[[p[0] for p in pairs]] * 2 - 1; rejected = drawn[[p[1] for p in pairs]] * 2 - 1
pcaps = [expanded[p[0]] for p in pairs]

start = evals(pipe, "start")
if not a.eval_only:
    unet, te = pipe.unet, pipe.text_encoder.eval().requires_grad_(False)
    ref = copy.deepcopy(unet).eval().requires_grad_(False)
    sched = images.make_scheduler("ddpm", pipe.scheduler.config)
    opt = torch.optim.AdamW([q for q in unet.parameters() if q.requires_grad], lr=a.lr, weight_decay=0)
    gen = torch.Generator().manual_seed(0)
    unet.train(); t0 = time.time(); hist = []
    for step in range(a.steps):
        idx = torch.randint(0, len(pcaps), (a.batch,), generator=gen)
        x = torch.cat([chosen[idx], rejected[idx]])
        with torch.no_grad():
            emb = images.encode_text(pipe, te, [pcaps[i] for i in idx.tolist()], x.device).repeat(2, 1, 1)
        noise = torch.randn((a.batch, *x.shape[1:]), generator=gen).repeat(2, 1, 1, 1)
        t = torch.randint(a.tmin, a.tmax, (a.batch,), generator=gen).repeat(2)
        noisy = sched.add_noise(x, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=emb).sample[:, :1]
        with torch.no_grad():
            rp = ref(noisy, t, encoder_hidden_states=emb).sample[:, :1]
        target = diffusion_train.denoise_target(sched, x, noise, t)
        loss, stats = diffusion_train.diffusion_dpo_loss(pred, rp, target, a.beta, winner_penalty=a.dpop)
        if a.anchor != "none":  # the plain denoising loss on the winners, or on both images of each pair
            anchored = slice(0, a.batch) if a.anchor == "winner" else slice(None)
            loss = loss + a.anchor_w * F.mse_loss(pred[anchored], target[anchored])
        opt.zero_grad(); loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0); opt.step()
        if (step + 1) % 25 == 0:
            h = dict(step=step + 1, loss=float(loss.detach()), **stats, s=round(time.time() - t0))
            hist.append(h); print(h, flush=True)
    unet.eval()
    res = evals(pipe, a.name)
    summary = {"args": vars(a), "pairs": len(pairs), "hist": hist}
    for split in ("train", "held"):
        for m in ("digit", "all"):
            d = [y - x for x, y in zip(start[split]["matches"][m], res[split]["matches"][m])]
            summary[f"{split}_{m}"] = (start[split]["acc"][m], res[split]["acc"][m], sum(d) / len(d))
    print("RESULT", json.dumps({k: v for k, v in summary.items() if k not in ("hist",)}), flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
