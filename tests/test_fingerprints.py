"""What the runner sees of a stage's inputs: its fingerprint (pipeline/runs.py `stage_inputs`: each input, and only
what the stage reads, so a stage reruns exactly when something it depends on changed) and the stages it waits for."""

import dataclasses
import sys

from conftest import tiny_recipe, write_jsonl
from pipeline import runs
from pipeline.fingerprints import hash_obj
from pipeline.recipe import load_recipe


def fingerprints(recipe, stages, *overrides) -> dict:
    loaded = load_recipe(recipe, list(overrides))
    return {stage: hash_obj(runs.stage_inputs(loaded, stage, must_exist=False)) for stage in stages}


def test_a_world_setting_reruns_only_the_stages_that_read_it(tmp_path):
    """label_noise used to rerun pretrain and everything after it (the whole world config was in every world
    split's fingerprint); now a split's fingerprint covers only the settings its rows are built from, and ppo's
    own annotator (reward rounds) reads label_noise whatever its prompts."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "What is 2 + 3?", "chosen": "The answer is 5.",
                                                     "rejected": "The answer is 6."}])
    recipe = tiny_recipe(tmp_path, reward={"max_steps": 2}, ppo={"prompts": "world:eval", "max_steps": 4},
                         dpo={"dataset": pairs, "rounds": 2, "round_labeller": "annotator", "max_steps": 2})
    stages = ("pretrain", "sft", "reward", "ppo", "dpo")
    plain = fingerprints(recipe, stages)
    noisier = fingerprints(recipe, stages, "world.label_noise=0.3")
    assert [s for s in stages if noisier[s] != plain[s]] == ["reward", "dpo"]  # dpo: its annotator's rounds
    more_sft = fingerprints(recipe, stages, "world.n_sft=50")
    assert [s for s in stages if more_sft[s] != plain[s]] == ["sft"]
    rounds = fingerprints(recipe, stages, "ppo.reward_rounds=2")
    assert fingerprints(recipe, stages, "ppo.reward_rounds=2", "world.label_noise=0.3")["ppo"] != rounds["ppo"]


def test_rewriting_what_a_new_models_tokenizer_reads_reruns_the_stages_built_on_it(tmp_path):
    """The tokenizer was fingerprinted by its settings alone: a rewritten local `tokenizer.name_or_path` folder left
    the stages on the new model "up to date". A trained tokenizer reads pretrain's own corpus (in pretrain's
    fingerprint), not `tokenizer.dataset`: that file is not read, so neither a rewrite nor its absence matters."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one document\n\nanother document\n")
    trained = tiny_recipe(tmp_path, tokenizer={"train": True, "dataset": str(corpus)})
    before = fingerprints(trained, ["pretrain", "sft"])
    corpus.unlink()
    assert fingerprints(trained, ["pretrain", "sft"]) == before

    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{}")
    named = tiny_recipe(tmp_path, pretrain=None, tokenizer={"train": False, "name_or_path": str(folder)})
    before = fingerprints(named, ["sft"])
    (folder / "tokenizer.json").write_text('{"model": "retrained"}')
    assert fingerprints(named, ["sft"]) != before


def test_built_in_datasets_are_no_local_files_and_keep_their_fingerprints(tmp_path):
    """`images:digits` read as a path (so data.fingerprint special-cased it); the digit world's held-out captions
    at their default stay out of the image stages' inputs by a field flag, not by the key's name."""
    from pipeline import data
    from pipeline.files import names_a_local_file
    from pipeline.stages import STAGES
    from test_diffusion import TINY_DIFFUSION, image_recipe

    assert not names_a_local_file("images:digits") and not names_a_local_file("world:sft")
    assert names_a_local_file("digits") and names_a_local_file("data/sft.jsonl") and not names_a_local_file("org/x")
    recipe = load_recipe(image_recipe(tmp_path, diffusion=TINY_DIFFUSION))
    assert data.fingerprint("images:digits", recipe, images=True) == hash_obj({"hub": "images:digits"})
    flagged = [(s, f.name) for s, spec in STAGES.items() for f in dataclasses.fields(spec.keys)
               if f.metadata.get("out_at_default")]
    assert flagged == [("diffusion", "heldout_captions"), ("diffusion_dpo", "heldout_captions")]
    named = load_recipe(image_recipe(tmp_path, diffusion={**TINY_DIFFUSION, "heldout_captions": "images:digits"}))
    data_of = [runs.stage_inputs(r, "diffusion", False)["data"] for r in (recipe, named)]
    assert data_of[0] == data_of[1] and "heldout_captions" not in data_of[0]


def test_eval_with_checkpoints_named_by_hand_waits_for_the_reward_stage_it_reads(tmp_path, monkeypatch, capsys):
    """`reward_model: auto` takes a finished reward stage only; with run.parallel_stages 2 eval started beside the
    reward stage (it was not among eval's dependencies) and read it or not by timing."""
    from pipeline import run
    from pipeline.run import dependencies, order_stages

    recipe = tiny_recipe(tmp_path, run={"parallel_stages": 2}, eval={"checkpoints": ["sft"]}, reward={"max_steps": 2})
    loaded = load_recipe(recipe)
    assert loaded.keys("eval").reward_model is None and "reward" in dependencies(loaded, "eval")
    assert order_stages(loaded).index("eval") > order_stages(loaded).index("reward")
    assert "reward" not in dependencies(loaded, "eval", planned=["eval"])  # --only eval: no reward stage to wait for
    assert "reward" not in dependencies(load_recipe(recipe, ["eval.reward_model="]), "eval")
    # the runner (stages stood in for by short processes): eval starts once reward is done, not beside it
    monkeypatch.setattr(run, "stage_command", lambda recipe, stage, overrides: [
        sys.executable, "-c", f"import time; time.sleep({1.5 if stage == 'reward' else 0.1})"])
    assert run.run_stages(loaded, ["reward", "eval"], []) is None
    out = capsys.readouterr().out
    assert "=== eval (beside" not in out and out.index("=== reward done") < out.index("=== eval")


def test_the_runners_early_check_tells_a_checkpoint_reference_as_the_stage_loading_it_does(tmp_path, monkeypatch):
    """run.check_references repeated resolve_checkpoint's rules (a stage, `model`, an existing path, else a hub id
    unless a path or a misspelt stage's name): both now ask references.reference_kind. The runner's check passes and
    stops on the same references with the same line, and hashes nothing (a big local folder costs it nothing)."""
    import pytest

    from pipeline import references
    from pipeline.cli import PipelineError
    from pipeline.run import check_references

    def outcome(call):
        try:
            return call(), None
        except PipelineError as err:
            return None, str(err)

    folder, file = tmp_path / "weights", tmp_path / "model.safetensors"
    folder.mkdir()
    file.write_text("x")
    kinds = {"model": "model", "pretrain": "stage", "dpo": "stage", str(folder): "local", str(file): "local",
             "org/name": "hub", "gpt2": "hub", "./nope": None, str(tmp_path / "nope"): None, "a/b/c": None,
             "rewrd": None}
    path = tiny_recipe(tmp_path)
    for ref, kind in kinds.items():
        recipe = load_recipe(path, [f"sft.init_from={ref}"])
        assert outcome(lambda: references.reference_kind(recipe, ref))[0] == kind, ref
        source, refused = outcome(lambda: runs.resolve_checkpoint(recipe, ref, False, "sft.init_from").source)
        assert source == {"model": "config"}.get(kind, kind) and (refused is None) == (kind is not None), ref
        with monkeypatch.context() as nothing_hashed:
            for name in ("hash_file", "hash_folder", "hash_obj"):
                nothing_hashed.setattr(runs, name, lambda *_: pytest.fail("check_references hashed"))
            assert outcome(lambda: check_references(recipe, "sft")) == (None, refused), ref
    assert refused.endswith("sft.init_from: 'rewrd' is not a stage of this recipe, a folder or a hub id "
                            "(closest: reward)")


def test_a_stage_trained_by_other_code_is_skipped_and_says_so(tmp_path, monkeypatch, capsys):
    """The fingerprint leaves the package's code out (an edited comment must not retrain a stage), so a stage trained
    before a fix to the training code was skipped as plainly "up to date". Its manifest now records the code: the
    runner still skips it, and says it was trained by other code. A manifest from before (no `code`) says nothing."""
    from pipeline import run

    monkeypatch.chdir(tmp_path)  # the run folder, runs/tiny, is relative
    recipe = load_recipe(tiny_recipe(tmp_path))
    folder = recipe.stage_dir("pretrain")
    folder.mkdir(parents=True)
    inputs = runs.stage_inputs(recipe, "pretrain", must_exist=False)

    def finished(**code):  # a finished stage as the runner reads it (no model files: none to check)
        runs.write_json(folder / runs.MANIFEST, {"fingerprint": hash_obj(inputs), "inputs": inputs, **code})
        return runs.up_to_date(recipe, "pretrain")

    assert finished(code=runs.stage_code("pretrain")) == (True, "up to date")
    assert finished() == (True, "up to date")  # written before `code` was recorded
    other = "up to date, but trained by other pipeline code: --only pretrain --force retrains it"
    assert finished(code="0" * 16) == (True, other)
    run.main([str(recipe.path), "--dry-run", "--only", "pretrain"])
    assert f"  pretrain   skip  ({other})\n" in capsys.readouterr().out


def test_a_finished_stage_records_the_code_that_trained_it(tiny_run, monkeypatch):
    """A stage's manifest records the code that trained it (not in its fingerprint); the same code reads it plainly up
    to date."""
    import json

    work, recipe, _ = tiny_run
    monkeypatch.chdir(work)
    code = json.loads((work / "runs" / "tiny" / "pretrain" / runs.MANIFEST).read_text())["code"]
    assert code == runs.stage_code("pretrain")
    assert runs.up_to_date(load_recipe(recipe), "pretrain") == (True, "up to date")


def fake_package(folder, edited: str | None = None):
    """A package of five modules: `stage` imports `shared` at the top, which imports `deep` (two hops), and `lazy`
    inside a function; `other` imports `shared` but nothing imports it. `edited` gets a comment appended."""
    sources = {"__init__": "", "stage": "from pipeline import shared\n\ndef run():\n    from pipeline.lazy import f\n",
               "shared": "import pipeline.deep\n", "deep": "", "lazy": "def f():\n    pass\n",
               "other": "from pipeline import shared\n"}
    folder.mkdir()
    for name, text in sources.items():
        (folder / f"{name}.py").write_text(text + "# an edit\n" * (name == edited))
    return folder


def test_a_stages_code_hash_covers_only_the_modules_its_script_can_run(tmp_path, monkeypatch):
    """The code hash covered every module of the package, so any commit (a comment in a module the stage never runs)
    made every finished stage read as trained by other code and every eval record be made again. It covers the
    stage script's import closure now: imports at the top, inside functions, through other modules."""
    from pipeline import fingerprints, imports_graph
    from pipeline.fingerprints import code_hash

    def stage_hash(edited=None):  # a folder each: the per-process cache is by folder
        return code_hash("pipeline.stage", package=fake_package(tmp_path / str(edited), edited))

    plain = stage_hash()
    assert stage_hash("other") == plain  # not imported by the stage: not its code
    assert stage_hash("stage") != plain
    assert stage_hash("lazy") != plain  # imported only inside a function
    assert stage_hash("deep") != plain  # two hops away
    assert stage_hash("__init__") != plain  # runs before any module of the package
    assert code_hash("pipeline.other", package=tmp_path / "None") != plain

    parsed = []  # each module is read once per process, however many stages reach it
    monkeypatch.setattr(imports_graph, "parse", lambda path, real=imports_graph.parse: parsed.append(path.name)
                        or real(path))
    monkeypatch.setattr(fingerprints, "_CODE", {})
    assert [code_hash("pipeline.stage", package=tmp_path / "None") for _ in range(3)] == [plain] * 3
    code_hash("pipeline.other", package=tmp_path / "None")
    assert sorted(parsed) == sorted(p.name for p in (tmp_path / "None").glob("*.py"))


def test_a_file_no_stage_imports_may_not_parse(tmp_path):
    """Every module of the package was parsed for any stage's code hash, so a scratch file with a syntax error beside
    the modules (one nothing imports) made every StageRun and every runner plan stop with a traceback. Only the
    modules a closure reaches are read now, as bytes (UTF-8 whatever the locale)."""
    from pipeline.fingerprints import code_hash

    plain = code_hash("pipeline.stage", package=fake_package(tmp_path / "plain"))
    scratch = fake_package(tmp_path / "scratch")
    (scratch / "scratch.py").write_text("def broken(:\n")
    assert code_hash("pipeline.stage", package=scratch) == plain  # not the stage's code: not read
    unicode = fake_package(tmp_path / "unicode")
    (unicode / "deep.py").write_bytes("# für alle\n".encode())  # a module it reaches, not ASCII
    assert code_hash("pipeline.stage", package=unicode) != plain


def test_an_edit_outside_a_stages_closure_keeps_its_code_hash_in_the_real_package(tmp_path):
    """The same on a copy of this package: a comment in PPO's trainer is not code pretrain runs (its manifest keeps
    reading plainly up to date), but it is ppo's; a comment in a module every stage imports is every stage's."""
    import shutil

    from pipeline.fingerprints import code_hash
    from pipeline.imports_graph import PACKAGE

    def hashes(edited: str | None) -> dict:
        copy = tmp_path / str(edited)
        copy.mkdir()
        for p in PACKAGE.glob("*.py"):
            shutil.copy(p, copy / p.name)
        if edited:
            (copy / f"{edited}.py").write_text((copy / f"{edited}.py").read_text() + "# an edit\n")
        return {m: code_hash(f"pipeline.{m}", package=copy) for m in ("pretrain", "ppo")}

    plain = hashes(None)
    trainer = hashes("ppo_trainer")
    assert trainer["pretrain"] == plain["pretrain"] and trainer["ppo"] != plain["ppo"]
    shared = hashes("runs")
    assert shared["pretrain"] != plain["pretrain"] and shared["ppo"] != plain["ppo"]


def test_eval_records_key_on_the_eval_stages_code(tmp_path):
    """An eval record keeps the code of the eval stage's closure, as its manifest does: an edit elsewhere (PPO's
    trainer) no longer makes every checkpoint's replies be generated again."""
    from types import SimpleNamespace

    from pipeline import eval_records
    from pipeline.fingerprints import code_hash

    recipe = load_recipe(tiny_recipe(tmp_path))
    target = SimpleNamespace(checkpoint=None, tokenizer=SimpleNamespace(chat_template=None))
    assert eval_records.common(recipe, target, seed=0)["code"] == code_hash("pipeline.evaluate")
