"""Stage logging (pipeline/log.py): `[stage]` lines from the main process only, kept in the stage folder's log.txt
from the first line on, including lines logged before the folder existed."""

import pytest

from pipeline import log


@pytest.fixture(autouse=True)
def outside_a_stage():
    yield
    log.setup("pipeline")
    log.close()


def test_lines_before_and_after_the_folder_exists_land_in_log_txt(tmp_path, capsys):
    log.setup("demo")
    log.info("read %d rows", 12)
    log.attach_file(tmp_path)
    log.warning("something to look at")
    log.close()
    log.info("after the folder was published")
    out = capsys.readouterr().out
    assert "[demo] read 12 rows" in out and "[demo] WARNING: something to look at" in out
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert len(lines) == 2 and "[demo] INFO read 12 rows" in lines[0] and "WARNING something to look at" in lines[1]


def test_a_resumed_stage_appends(tmp_path):
    for attempt in ("first", "second"):
        log.setup("demo")
        log.attach_file(tmp_path)
        log.info(attempt)
        log.close()
    assert [line.rsplit(" ", 1)[-1] for line in (tmp_path / "log.txt").read_text().splitlines()] == ["first", "second"]


def test_other_processes_log_only_errors(tmp_path, capsys):
    log.setup("demo", is_main_process=False)
    log.info("every process would repeat this")
    log.attach_file(tmp_path)
    log.error("but not this")
    log.close()
    out = capsys.readouterr().out
    assert "repeat" not in out and "[demo] ERROR: but not this" in out
    assert not (tmp_path / "log.txt").exists()


def test_a_finished_stage_folder_has_its_log(tiny_run):
    work, _, _ = tiny_run
    text = (work / "runs/tiny/pretrain/log.txt").read_text()
    assert "[pretrain] INFO" in text and "parameters" in text and "eval loss" in text
    sft = (work / "runs/tiny/sft/log.txt").read_text()
    assert "held-out verifier accuracy of sft" in sft and "[pretrain]" not in sft
