import logging

import pytest

from softfine.data import read_bmes, read_columns, read_fine, read_weibo, stats, to_bioes
from softfine.datasets import available_splits, dataset_files, read_split
from softfine.errors import DataError


def test_table1_figures(data_dir):
    weibo = stats(read_split("weibo", "train", data_dir, on_problem="keep"))
    resume = stats(read_split("resume", "train", data_dir, on_problem="keep"))
    fine = stats(read_split("fine", "dev", data_dir, on_problem="keep"))
    assert (weibo["sentences"], round(weibo["avg_chars"], 1), round(weibo["avg_entities"], 1)) == (1350, 54.7, 1.4)
    assert (resume["sentences"], round(resume["avg_chars"], 1), round(resume["avg_entities"], 1)) == (3821, 32.5, 3.5)
    assert (fine["sentences"], round(fine["avg_chars"], 1), round(fine["avg_entities"], 1)) == (3000, 41.6, 2.5)
    assert fine["categories"] == 54


def test_weibo_strips_position_digits_and_converts_to_bioes(data_dir):
    sentences = read_weibo(data_dir / "weibo" / "weiboNER_2nd_conll.train")
    assert sentences[0].chars[:4] == ("科", "技", "全", "方")
    every_char = [c for s in sentences for c in s.chars]
    assert not any(c[-1].isdigit() and len(c) > 1 for c in every_char)
    tags = {t.split("-")[0] for s in sentences for t in s.tags}
    assert tags <= {"O", "B", "I", "E", "S"} and {"S", "E"} <= tags


def test_resume_bmes_becomes_bioes(data_dir):
    first = read_bmes(data_dir / "resume" / "train.char.bmes")[0]
    assert first.chars[:2] == ("高", "勇") and first.tags[:2] == ("B-NAME", "E-NAME")
    assert first.tags[5:9] == ("B-CONT", "I-CONT", "I-CONT", "E-CONT")


def test_fine_spans_and_hierarchical_categories(data_dir):
    first = read_fine(data_dir / "fine" / "dev.json")[0]
    text = "".join(first.chars)
    start = text.index("雷诺")
    assert first.tags[start:start + 2] == ("B-/organization/company/vehicle_brand", "E-/organization/company/vehicle_brand")


def test_fine_span_mismatch_is_reported_and_skipped(data_dir, caplog):
    with caplog.at_level(logging.WARNING):
        sentences = read_fine(data_dir / "fine" / "dev.json")
    assert len(sentences) == 2997
    assert "dev.json:1902: id 65683: span [36, 71] reads" in caplog.text
    assert "skipped 3 of 3000 sentences" in caplog.text
    with pytest.raises(DataError, match=r"dev.json:1902: id 65683"):
        read_fine(data_dir / "fine" / "dev.json", on_problem="error")


def test_fine_missing_splits_are_named_and_present_ones_work(data_dir):
    assert available_splits("fine", data_dir) == ["dev"]
    with pytest.raises(DataError, match=r"fine/train.json"):
        dataset_files("fine", data_dir)


@pytest.mark.parametrize("content, message, line", [
    ("中 B-PER\n人\n国 E-PER\n", "malformed line '人'", 2),
    ("中 B-PER\n国 X-PER\n", "unknown tag prefix", 2),
    ("中 O\n国 M-PER\n人 E-PER\n", "has no opening B-PER", 2),
    ("中 B-PER\n国 I-PER\n人 E-PER\n", "unknown tag prefix", 2),
    ("中 O\n国 E-PER\n", "has no opening B-PER", 2),
    ("中 B-PER\n国 O\n", "never closed", 2),
    ("中 B-PER\n国 M-PER\n", "still open at the end", 2),
    ("中 B-PER\n国 M-LOC\n人 E-LOC\n", "has no opening B-LOC", 2),
])
def test_bad_column_files(tmp_path, caplog, content, message, line):
    good = "好 S-LOC\n\n"
    path = tmp_path / "bad.char.bmes"
    path.write_text(good + content, encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        sentences = read_bmes(path)
    assert [s.tags for s in sentences] == [("S-LOC",)]  # the bad sentence is dropped, never relabelled
    assert f"bad.char.bmes:{line + 2}: " in caplog.text and message in caplog.text
    assert "skipped 1 of 2 sentences" in caplog.text
    with pytest.raises(DataError, match=rf"bad.char.bmes:{line + 2}: .*{message[:20]}"):
        read_bmes(path, on_problem="error")


@pytest.mark.parametrize("record, message", [
    ('{"id": 1, "text": "北京欢迎你", "label": {"/location": {"上海": [[0, 1]]}}}', "reads '北京', not its mention '上海'"),
    ('{"id": 2, "text": "北京欢迎你", "label": {"/location": {"北京": [[0, 9]]}}}', "outside the text"),
    ('{"id": 3, "text": "北京欢迎你", "label": {"/location": {"北京": [[0, 1]], "京欢": [[1, 2]]}}}', "overlaps"),
    ('{"id": 4, "text": "北京", "label": {"/location": ["北京"]}}', "malformed \"label\""),
    ('{"id": 5, "text": "北京"', "not valid JSON"),
])
def test_bad_fine_records(tmp_path, caplog, record, message):
    path = tmp_path / "dev.json"
    path.write_text('{"id": 0, "text": "你好", "label": {}}\n' + record + "\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        sentences = read_fine(path)
    assert len(sentences) == 1 and "dev.json:2: " in caplog.text and message in caplog.text
    with pytest.raises(DataError, match="dev.json:2: "):
        read_fine(path, on_problem="error")


def test_empty_and_missing_files_are_errors(tmp_path):
    empty = tmp_path / "empty.char.bmes"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty.char.bmes: the file is empty"):
        read_bmes(empty)
    with pytest.raises(DataError, match="nothing.char.bmes: no such data file"):
        read_bmes(tmp_path / "nothing.char.bmes")
    latin1 = tmp_path / "latin1.char.bmes"
    latin1.write_bytes("é O\n".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.char.bmes: not UTF-8"):
        read_bmes(latin1)


def test_generic_column_reader_bio_and_bioes(tmp_path):
    path = tmp_path / "mine.tsv"
    path.write_text("张 x B-PER\n三 x I-PER\n去 x O\n京 x B-LOC\n\n", encoding="utf-8")
    [sentence] = read_columns(path, scheme="bio")
    assert sentence.tags == ("B-PER", "E-PER", "O", "S-LOC")


def test_bio_conversion():
    assert to_bioes(["B-X", "I-X", "I-X", "O", "B-Y", "B-Y", "I-Y"], "bio") == \
        ["B-X", "I-X", "E-X", "O", "S-Y", "B-Y", "E-Y"]
    assert to_bioes(["B-X", "M-X", "E-X", "S-Y"], "bmes") == ["B-X", "I-X", "E-X", "S-Y"]
