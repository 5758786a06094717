"""Diffusion-DPO on preference pairs of your own (pipeline/image_pairs.py): Pick-a-Pic's layout (caption, jpg_0,
jpg_1, label_0; images as bytes in a parquet file) and chosen / rejected files, trained on a hub-shaped pipeline
with no image judge, evaluated on held-out pairs."""

import io
import json

import pytest
import torch

from conftest import run_cli
from pipeline import image_pairs
from pipeline.cli import PipelineError
from test_diffusion import _tiny_stable_diffusion, _unet_weights, counting_rows, image_recipe


def png(value: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (16, 16), (value,) * 3).save(out, format="PNG")
    return out.getvalue()


def pickapic(path, n: int = 24, tie: bool = True):
    """n pairs of a white and a black square, the white one preferred: jpg_0 in even rows (label_0 1), jpg_1 in odd
    ones (label_0 0); and one tie (label_0 0.5), which is dropped."""
    import datasets

    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": []}
    for i in range(n):
        white_first = i % 2 == 0
        rows["caption"].append(f"a {i % 10}")
        rows["jpg_0"].append({"bytes": png(255 if white_first else 0), "path": None})
        rows["jpg_1"].append({"bytes": png(0 if white_first else 255), "path": None})
        rows["label_0"].append(1.0 if white_first else 0.0)
    if tie:
        for key, value in (("caption", "a 1"), ("jpg_0", {"bytes": png(9), "path": None}),
                           ("jpg_1", {"bytes": png(99), "path": None}), ("label_0", 0.5)):
            rows[key].append(value)
    features = datasets.Features({"caption": datasets.Value("string"), "jpg_0": datasets.Image(),
                                  "jpg_1": datasets.Image(), "label_0": datasets.Value("float64")})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(path)
    return path


def chosen_rejected(folder, chosen: str, rejected: str, n: int = 8):
    """A folder of two image files and a metadata.jsonl of `prompt`, `chosen`, `rejected` rows naming them."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), "white").save(folder / "white.png")
    Image.new("RGB", (16, 16), "black").save(folder / "black.png")
    (folder / "metadata.jsonl").write_text("".join(
        json.dumps({"prompt": f"a {i}", "chosen": chosen, "rejected": rejected}) + "\n" for i in range(n)))
    return folder


def own_pairs_recipe(work, base, dataset, **extra):
    section = {"init_from": str(base), "dataset": str(dataset), "heldout_captions": None, "max_steps": 30,
               "batch_size": 4, "learning_rate": 1e-3, "beta": 500.0, "logging_steps": 10, "save_steps": 0,
               "heldout_samples": 2, "sample_steps": 2, "grid_columns": 2, **extra}
    return image_recipe(work, diffusion_dpo=section)


def test_pickapic_labels_pick_the_chosen_image_and_ties_are_dropped(tmp_path):
    """label_0 1: jpg_0 is the chosen image, 0: jpg_1 is; 0.5 (a tie) is dropped, as the official script does."""
    files = image_pairs.read_pairs(pickapic(tmp_path / "train.parquet"), channels=3, resolution=16)
    assert len(files) == 24 and files.ties == 1
    chosen, rejected, captions = files.batch(list(range(24)))
    assert torch.all(chosen == 1.0) and torch.all(rejected == -1.0)  # white chosen, in [-1, 1], whichever column
    assert captions == [f"a {i % 10}" for i in range(24)]


@pytest.mark.parametrize("row, expected", [
    ({"caption": "a 1", "jpg_0": "x.png", "jpg_1": "y.png", "label_0": 2},
     "line 1: label_0 must be 1 (jpg_0 preferred), 0 (jpg_1 preferred) or 0.5 (a tie), got 2"),
    ({"caption": "a 1", "jpg_0": "white.png", "label_0": 1},
     "line 1: missing 'jpg_1': an image file's path, relative to pairs.jsonl, or the image's bytes"),
    ({"jpg_0": "white.png", "jpg_1": "white.png", "label_0": 1},
     "line 1: missing caption ('caption', 'prompt' or 'text'"),
    ({"caption": "a 1", "chosen": "white.png", "rejected": "gone.png"}, "line 1: cannot read image 'gone.png'"),
    ({"caption": "a 1", "jpg_0": "white.png", "jpg_1": "white.png", "label_0": 0.5},
     "no pair with a preference (1 ties, label_0 0.5, dropped)"),
])
def test_bad_pair_rows_raise_one_line_errors_naming_the_row(tmp_path, row, expected):
    from PIL import Image

    Image.new("RGB", (16, 16), "white").save(tmp_path / "white.png")
    (tmp_path / "pairs.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(PipelineError) as err:
        image_pairs.read_pairs(tmp_path / "pairs.jsonl", channels=3, resolution=16)
    assert str(err.value).startswith(f"{tmp_path / 'pairs.jsonl'}: ") and expected in str(err.value)


def test_implicit_accuracy_is_a_half_at_the_start_and_counts_pairs_the_model_prefers():
    """Per pair: the change of the winner's error against the reference minus the loser's. The start model (the
    reference itself) changes nothing: 0.5; a model closer to the target on the winners only: 1.0."""
    pairs = image_pairs.DrawnPairs(torch.zeros(6, 1, 4, 4), torch.zeros(6, 1, 4, 4), ["a 1"] * 6)

    def forward(better):
        def run(chosen, rejected, captions, gen):
            target = torch.randn((2 * len(captions), 1, 4, 4), generator=gen)
            ref = target + 0.5
            pred = ref.clone()
            if better:
                pred[:len(captions)] = target[:len(captions)] + 0.1  # the winners' error falls
            return pred, ref, target
        return run

    start = image_pairs.implicit_accuracy(forward(False), pairs, batch_size=4, draws=2, seed=0)
    tuned = image_pairs.implicit_accuracy(forward(True), pairs, batch_size=4, draws=2, seed=0)
    assert start["mean"] == 0.5 and start["mean_error_change"] == 0.0 and start["pairs"] == 6
    assert tuned["mean"] == 1.0 and tuned["mean_error_change"] < 0 and tuned["ci"] == [1.0, 1.0]


def test_own_pairs_tune_a_pipeline_without_a_judge_toward_the_labelled_preference(tmp_path):
    """A hub-shaped pipeline (VAE, CLIP) with no image judge trains on Pick-a-Pic rows (white preferred, in either
    column); held-out pairs in the chosen / rejected layout say how often the tuned model prefers as labelled. The
    same held-out pairs with the preference reversed score below a half: the stage learnt the labels, not a
    column."""
    from diffusers import DiffusionPipeline
    from PIL import Image

    base = _tiny_stable_diffusion(tmp_path / "tiny-sd")
    train = pickapic(tmp_path / "train.parquet")
    agree, disagree = (chosen_rejected(tmp_path / name, c, r) for name, c, r in
                       (("held", "white.png", "black.png"), ("reversed", "black.png", "white.png")))
    for name, held in (("agree", agree), ("reversed", disagree)):
        recipe = own_pairs_recipe(tmp_path, base, train, eval_dataset=str(held))
        proc = run_cli(["pipeline/diffusion_dpo.py", recipe, f"run.name={name}"], cwd=tmp_path,
                       env={"OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "runs/agree/diffusion_dpo"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pairs"] == 24 and metrics["ties_dropped"] == 1 and "rounds" not in metrics
    assert metrics["heldout_pairs"]["pairs"] == 8 and metrics["heldout_pair_accuracy"] > 0.5
    reversed_ = json.loads((tmp_path / "runs/reversed/diffusion_dpo/metrics.json").read_text())
    assert reversed_["heldout_pair_accuracy"] < 0.5
    assert not (out / "judge").exists() and "Held-out pairs" in (out / "report.md").read_text()
    grid = Image.open(out / "grid.png")
    assert grid.size[1] == 16 * (16 * 3 + 2) + 2 and grid.mode == "RGB"  # start and tuned rows of 8 captions, in
                                                                          # colour (grids were grey for RGB models)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["data"]["dataset"]["spec"] == str(train)
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    before, after = _unet_weights(base), _unet_weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_own_pairs_refuse_rounds_and_check_reads_them_without_a_judge(tmp_path):
    """Later rounds draw candidates for the image judge to label: with pairs of your own the stage stops at once in
    one line, writing nothing; `--check` says so, names a pair whose image file is missing, and asks for no judge
    (none is read without held-out captions); with held-out captions both ask for one, the stage before writing
    anything."""
    base = _tiny_stable_diffusion(tmp_path / "tiny-sd")
    train = pickapic(tmp_path / "train.parquet", n=4, tie=False)
    recipe = own_pairs_recipe(tmp_path, base, train, rounds=2)
    proc = run_cli(["pipeline/diffusion_dpo.py", recipe], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {recipe}: diffusion_dpo.rounds: 2: later rounds draw new candidates for the image judge to label; "
        f"pairs of your own ({train}) train in one round")
    assert not (tmp_path / "runs").exists()
    held = chosen_rejected(tmp_path / "held", "white.png", "gone.png", n=2)
    recipe = own_pairs_recipe(tmp_path, base, train, rounds=2, eval_dataset=str(held))
    check = run_cli(["pipeline/run.py", recipe, "--check"], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert check.returncode == 2 and "Traceback" not in check.stderr, check.stderr[-2000:]
    assert "diffusion_dpo.rounds: 2: later rounds draw new candidates" in check.stdout
    assert f"diffusion_dpo.eval_dataset: {held / 'metadata.jsonl'}: line 1: no image file {held / 'gone.png'}" \
        in check.stdout
    assert "diffusion_dpo.judge" not in check.stdout and "2 error(s)" in check.stdout
    recipe = own_pairs_recipe(tmp_path, base, train, eval_dataset=str(tmp_path / "train.parquet"),
                              heldout_captions="images:digits")  # held-out captions: scored by the judge
    check = run_cli(["pipeline/run.py", recipe, "--check"], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert check.returncode == 2 and f"diffusion_dpo.judge: no image judge in {base / 'judge'}" in check.stdout
    assert "or set heldout_captions empty" in check.stdout
    proc = run_cli(["pipeline/diffusion_dpo.py", recipe], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {recipe}: diffusion_dpo.judge: no image judge in {base / 'judge'}, with which the held-out captions "
        f"are scored (train the diffusion stage with judge_epochs > 0, or point `judge` at one, or set "
        f"heldout_captions empty)")
    assert not (tmp_path / "runs").exists()


@pytest.fixture()
def hub_pairs(monkeypatch):
    """serve(rows) -> reads: datasets.load_dataset stands in for the hub, serving `rows` (a dict of columns) as a
    memory-mapped-like Dataset that notes every row it reads in `reads`; the reader's cache is cleared around it."""
    import datasets

    from pipeline import hub, image_files

    reads = []

    def serve(rows: dict) -> list:
        monkeypatch.setattr(datasets, "load_dataset",
                            lambda name, split=None, **kw: counting_rows(datasets.Dataset.from_dict(rows), reads))
        return reads

    monkeypatch.setattr(hub, "reachable", lambda: True)
    image_files.hub_rows.cache_clear()
    yield serve
    image_files.hub_rows.cache_clear()


def test_pickapic_from_the_hub_reads_its_binary_image_columns(hub_pairs):
    """yuvalkirstain/pickapic_v2 stores jpg_0 / jpg_1 as binary columns (not an Image feature): a hub id in
    `dataset` loads with datasets.load_dataset (here a stand-in returning such a dataset) and reads them."""
    reads = hub_pairs({"caption": ["a 1", "a 2", "a 3"], "jpg_0": [png(255), png(0), png(7)],
                       "jpg_1": [png(0), png(255), png(7)], "label_0": [1.0, 0.0, 0.5]})
    assert image_pairs.pair_file("someone/pickapic") == "someone/pickapic"
    pairs = image_pairs.read_pairs("someone/pickapic", channels=3, resolution=16)
    reads.clear()  # the images stay in the dataset: a batch of 2 pairs reads their 2 rows again
    chosen, rejected, captions = pairs.batch([0, 1])
    assert sorted(reads) == [0, 1] and pairs.ties == 1 and captions == ["a 1", "a 2"]
    assert torch.all(chosen == 1.0) and torch.all(rejected == -1.0)


def test_a_hub_pair_dataset_is_read_once_at_the_start_in_the_stage_and_in_check(tmp_path, hub_pairs):
    """Pick-a-Pic has ~1M rows: a pass over it costs minutes. The stage read every row to sort out ties and
    orientation, then every kept row again to decode its images; `--check` read them all again to look for missing
    files, which a hub dataset's stored bytes cannot be. Now each reads every row once, tie or not."""
    from pipeline import image_check
    from pipeline.recipe import load_recipe

    reads = hub_pairs({"caption": [f"a {i}" for i in range(5)], "jpg_0": [png(255), png(0), png(7), png(255), png(0)],
                       "jpg_1": [png(0), png(255), png(7), png(0), png(255)], "label_0": [1.0, 0.0, 0.5, 1.0, 0.0]})
    assert image_pairs.pair_file("someone/pickapic") == "someone/pickapic"
    pairs = image_pairs.read_pairs("someone/pickapic", channels=3, resolution=16)
    assert len(pairs) == 4 and pairs.ties == 1 and sorted(reads) == [0, 1, 2, 3, 4]
    reads.clear()
    recipe = load_recipe(own_pairs_recipe(tmp_path, tmp_path / "base", "someone/pickapic"))
    keys = recipe.keys("diffusion_dpo")
    assert image_check.caption_and_judge_problems(recipe, "diffusion_dpo", keys, keys.init_from) == []
    assert sorted(reads) == [0, 1, 2, 3, 4]


ROW = json.dumps({"prompt": "a 1", "chosen": "white.png", "rejected": "black.png"})


@pytest.mark.parametrize("name, lines, expected", [
    ("pairs.jsonl", [ROW, "", ROW, "{not json"], "line 4: invalid JSON"),
    ("pairs.csv", ["prompt,chosen,rejected", "a 1,white.png,black.png", "a 2,white.png,black.png",
                   "a 3,white.png,black.png,extra,fields"], "cannot read csv"),
])
def test_pair_file_reads_only_a_files_first_row_and_the_stage_names_a_bad_later_row(tmp_path, name, lines, expected):
    """A pairs file of a million rows was read whole to see its columns, and again by the stage. Its columns are
    the first row's: a later row that does not read is not read to find them (it failed here before) and is named
    by the stage's reader, with its line."""
    from PIL import Image

    Image.new("RGB", (16, 16), "white").save(tmp_path / "white.png")
    Image.new("RGB", (16, 16), "black").save(tmp_path / "black.png")
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    assert image_pairs.pair_file(str(path)) == path
    with pytest.raises(PipelineError, match=rf"^{path}: {expected}"):
        image_pairs.read_pairs(path, channels=3, resolution=16)


@pytest.mark.parametrize("name, text, expected", [
    ("pairs.csv", 'caption,chosen,rejected\n"a 1\nwritten over two lines",white.png,black.png\nnot,"a,row\n',
     {"caption": "a 1\nwritten over two lines", "chosen": "white.png", "rejected": "black.png"}),
    ("pairs.jsonl", '\n\n' + ROW + '\n{not json\n', json.loads(ROW)),
])
def test_a_files_first_row_is_read_whole_and_alone(tmp_path, name, text, expected):
    """A .csv's first record may hold a quoted field written over lines: it was cut at the line's end ("a 1", no
    images), now csv reads the record whole; neither file's bad later row is read (it would fail here)."""
    from pipeline.files import first_row

    path = tmp_path / name
    path.write_text(text)
    assert first_row(path) == expected


@pytest.mark.parametrize("reader", ["pairs", "images"])
def test_images_stored_in_a_local_parquet_file_are_read_with_their_row_not_held_in_memory(tmp_path, reader):
    """A local parquet file's images (Pick-a-Pic's shards hold theirs) were all read into memory (`to_list()`) and
    held for the whole run; a hub dataset's were not. Now the parquet file is read as a hub dataset is (memory-mapped
    by `datasets`): once the images are checked, what the reader holds is far smaller than the images."""
    import tracemalloc

    import datasets
    import numpy as np
    from PIL import Image

    from pipeline import images

    def noise(seed: int) -> dict:  # a PNG that does not compress: ~200 KB
        out = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(out, "PNG")
        return {"bytes": out.getvalue(), "path": None}

    n = 8
    if reader == "pairs":
        cells = {"caption": [f"a {i}" for i in range(n)], "jpg_0": [noise(2 * i) for i in range(n)],
                 "jpg_1": [noise(2 * i + 1) for i in range(n)], "label_0": [1.0] * n}
        features = {"caption": datasets.Value("string"), "jpg_0": datasets.Image(), "jpg_1": datasets.Image(),
                    "label_0": datasets.Value("float64")}
    else:
        cells = {"image": [noise(i) for i in range(n)], "text": [f"a {i}" for i in range(n)]}
        features = {"image": datasets.Image(), "text": datasets.Value("string")}
    datasets.Dataset.from_dict(cells, features=datasets.Features(features)).to_parquet(tmp_path / "metadata.parquet")
    stored = sum(len(c["bytes"]) for column in cells.values() for c in column if isinstance(c, dict))

    def read():
        if reader == "pairs":
            return image_pairs.read_pairs(tmp_path / "metadata.parquet", channels=3, resolution=16)
        return images.load_images(str(tmp_path), 16, 3)

    read()  # the first read converts the file into the datasets cache, as the stage's first run does
    tracemalloc.start()
    try:
        held = read()
        kept = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert stored > 1_000_000 and kept < stored / 4, (kept, stored)
    if reader == "pairs":  # and the images are read from their rows when a batch asks
        chosen, _, captions = held.batch([3])
        assert captions == ["a 3"] and chosen.shape == (1, 3, 16, 16)


def test_a_parquet_files_fingerprint_reads_its_names_not_its_stored_images(tmp_path):
    """The runner fingerprints the files a metadata file names on every run; a parquet file's rows were read whole for
    it, the images it stores (Pick-a-Pic's shards: GBs) included. Now only its text columns and its images' `path`
    are read: with the stored bytes' pages overwritten, the files it names are still found (none were before)."""
    import datasets
    from PIL import Image

    from pipeline.image_files import named_files

    for name, shade in (("white.png", "white"), ("black.png", "black")):
        Image.new("RGB", (16, 16), shade).save(tmp_path / name)
    stored = io.BytesIO()
    Image.new("RGB", (16, 16), "grey").save(stored, "PNG")
    path = tmp_path / "pairs.parquet"
    datasets.Dataset.from_dict(
        {"caption": ["a 1"], "jpg_0": [{"bytes": stored.getvalue(), "path": "white.png"}], "jpg_1": ["black.png"]},
        features=datasets.Features({"caption": datasets.Value("string"), "jpg_0": datasets.Image(),
                                    "jpg_1": datasets.Value("string")})).to_parquet(str(path))
    files = [(name, (tmp_path / name).stat().st_size, (tmp_path / name).stat().st_mtime_ns)
             for name in ("white.png", "black.png")]
    assert named_files(path) == files

    import pyarrow.parquet as pq

    chunks = pq.ParquetFile(path).metadata.row_group(0)
    chunk = next(chunks.column(i) for i in range(chunks.num_columns)
                 if chunks.column(i).path_in_schema == "jpg_0.bytes")
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    raw = bytearray(path.read_bytes())
    raw[start:start + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    path.write_bytes(bytes(raw))
    with pytest.raises(Exception):  # the stored images no longer read
        pq.read_table(path)
    assert named_files(path) == files


def test_a_pairs_key_naming_nothing_readable_is_dataset_sources_line_naming_the_key(tmp_path):
    """diffusion_dpo read a `dataset` folder without a metadata file as a file of captions: after loading its model
    it said "captions '...': not found" (or, with no judge, that none labels the pairs), naming no key; a folder
    without one or saved by save_to_disk as `eval_dataset` was "not found". Now each is dataset_source's line, with
    its key, before anything loads; None stays quiet where it is an answer (the world, a captions file)."""
    from types import SimpleNamespace

    import datasets

    empty, saved, gone = tmp_path / "empty", tmp_path / "saved", tmp_path / "gone"
    empty.mkdir()
    datasets.Dataset.from_dict({"caption": ["a 1"]}).save_to_disk(str(saved))
    pairs = chosen_rejected(tmp_path / "pairs", "white.png", "black.png", n=2) / "metadata.jsonl"
    captions = tmp_path / "captions.txt"
    captions.write_text("a 1\n")

    def problem(dataset, eval_dataset=None, own_file=None):
        keys = SimpleNamespace(dataset=str(dataset), eval_dataset=eval_dataset and str(eval_dataset))
        return image_pairs.section_problem(keys, 1, own_file, eval_dataset and image_pairs.pair_file(str(eval_dataset)))

    assert image_pairs.pair_file(str(empty)) is None
    assert problem(empty) == (f"dataset: '{empty}': no metadata.jsonl, .csv or .parquet in it or in its train/ folder "
                              f"(the imagefolder layout: rows of file_name and caption; data/README.md)")
    assert problem(gone).startswith(f"dataset: '{gone}': not found (expected images:digits, a .jsonl")
    assert problem(pairs, saved, pairs).startswith(f"eval_dataset: '{saved}': a datasets save_to_disk folder")
    assert problem(pairs, empty, pairs).startswith(f"eval_dataset: '{empty}': no metadata.jsonl")
    assert problem(pairs, gone, pairs).startswith(f"eval_dataset: '{gone}': not found (expected a .jsonl")
    assert problem(pairs, captions, pairs) == (f"eval_dataset: '{captions}' holds no preference pairs (rows of "
                                               f"caption, jpg_0, jpg_1, label_0 or of caption, chosen, rejected)")
    for fine in ("images:digits", captions):  # the world, a captions file: not pairs, and no problem
        assert image_pairs.pair_file(str(fine)) is None and problem(fine) is None
    assert problem(empty, own_file=False) is None  # not read: --check said it already
    recipe = own_pairs_recipe(tmp_path, tmp_path / "base", empty)
    proc = run_cli(["pipeline/diffusion_dpo.py", recipe], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == f"error: {recipe}: diffusion_dpo.{problem(empty)}"
    assert not (tmp_path / "runs").exists()
