import logging

import pytest

from softfine.data import read_bmes, read_columns, read_fine, read_weibo, to_bioes
from softfine.datasets import available_splits, dataset_files, read_split
from softfine.errors import DataError
from softfine.stats import stats


def test_table1_figures(data_dir):
    weibo = stats(read_split("weibo", "train", data_dir))
    resume = stats(read_split("resume", "train", data_dir))
    fine = stats(read_split("fine", "dev", data_dir))
    assert (weibo["sentences"], round(weibo["avg_chars"], 1), round(weibo["avg_entities"], 1)) == (
        1350,
        54.7,
        1.4,
    )
    assert (resume["sentences"], round(resume["avg_chars"], 1), round(resume["avg_entities"], 1)) == (
        3821,
        32.5,
        3.5,
    )
    assert (fine["sentences"], round(fine["avg_chars"], 1), round(fine["avg_entities"], 1)) == (
        3000,
        41.6,
        2.5,
    )
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
    assert first.tags[start : start + 2] == (
        "B-/organization/company/vehicle_brand",
        "E-/organization/company/vehicle_brand",
    )


@pytest.mark.parametrize(
    "dataset, split, sentences, entities",
    [
        ("weibo", "train", 1350, 1895),
        ("weibo", "dev", 270, 389),
        ("weibo", "test", 270, 418),
        ("resume", "train", 3821, 13440),
        ("resume", "dev", 463, 1497),
        ("resume", "test", 477, 1630),
        ("fine", "dev", 3000, 7619),
    ],
)
def test_every_sentence_of_every_split_is_read(data_dir, dataset, split, sentences, entities):
    read = read_split(dataset, split, data_dir)
    assert len(read) == sentences
    assert sum(tag[0] in "BS" for s in read for tag in s.tags) == entities


def test_weibo_test_sentences_with_an_unopened_entity_are_read_as_conlleval_does(data_dir, caplog):
    with caplog.at_level(logging.WARNING):
        test = read_split("weibo", "test", data_dir)
    assert "weiboNER_2nd_conll.test:4450: tag 'I-PER.NOM' at character 78 is not valid BIO" in caplog.text
    assert "read 4 of 270 sentences with invalid tags" in caplog.text
    # line 4450 is character 78 of the sentence that starts at line 4373: I-PER.NOM after O starts an entity
    [sentence] = [s for s in test if s.source.endswith(":4373")]
    assert sentence.tags[77:80] == ("B-PER.NOM", "I-PER.NOM", "E-PER.NOM")
    with pytest.raises(DataError, match=r"weiboNER_2nd_conll.test:4450: tag 'I-PER.NOM'"):
        read_split("weibo", "test", data_dir, strict=True)


def test_fine_mentions_match_after_nfkc(data_dir, caplog):
    with caplog.at_level(logging.WARNING):
        sentences = read_fine(data_dir / "fine" / "dev.json", on_problem="error")
    assert len(sentences) == 3000 and not caplog.text
    [record] = [s for s in sentences if s.source.endswith(":1902 (id 65683)")]
    assert record.tags[36][0] == "B" and record.tags[71][0] == "E"


def test_fine_missing_splits_are_named_and_present_ones_work(data_dir):
    assert available_splits("fine", data_dir) == ["dev"]
    with pytest.raises(DataError, match=r"fine/train.json"):
        dataset_files("fine", data_dir)


@pytest.mark.parametrize(
    "content, message, line",
    [
        ("中 B-PER\n人\n国 E-PER\n", "malformed line '人'", 2),
        ("中 B-PER\n国 X-PER\n", "unknown tag prefix", 2),
        ("中 B-PER\n国 I-PER\n人 E-PER\n", "unknown tag prefix", 2),
        ("高 XX B-NAME\n", "malformed line '高 XX B-NAME'", 1),
        ("中 B-\n", "empty category", 1),
    ],
)
def test_unreadable_sentences_are_skipped_in_train_and_errors_in_evaluation(
    tmp_path, caplog, content, message, line
):
    good = "好 S-LOC\n\n"
    path = tmp_path / "bad.char.bmes"
    path.write_text(good + content, encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        sentences = read_bmes(path)
    assert [s.tags for s in sentences] == [("S-LOC",)]  # the bad sentence is dropped, never relabelled
    assert f"bad.char.bmes:{line + 2}: " in caplog.text and message in caplog.text
    assert "skipped 1 of 2 sentences" in caplog.text
    for policy in ("refuse", "error"):
        with pytest.raises(DataError, match=rf"bad.char.bmes:{line + 2}: .*{message[:20]}"):
            read_bmes(path, on_problem=policy)


@pytest.mark.parametrize(
    "content, tags, line",
    [
        ("中 O\n国 M-PER\n人 E-PER\n", ("O", "B-PER", "E-PER"), 2),
        ("中 O\n国 E-PER\n", ("O", "S-PER"), 2),
        ("中 B-PER\n国 O\n", ("S-PER", "O"), 1),
        ("中 B-PER\n国 M-PER\n", ("B-PER", "E-PER"), 2),
        ("中 B-PER\n国 M-LOC\n人 E-LOC\n", ("S-PER", "B-LOC", "E-LOC"), 1),
    ],
)
def test_invalid_tags_are_read_as_conlleval_reads_them(tmp_path, caplog, content, tags, line):
    path = tmp_path / "bad.char.bmes"
    path.write_text("好 S-LOC\n\n" + content, encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        sentences = read_bmes(path, on_problem="refuse")
    assert [s.tags for s in sentences] == [("S-LOC",), tags]
    assert f"bad.char.bmes:{line + 2}: " in caplog.text and "read as conlleval does" in caplog.text
    with pytest.raises(DataError, match=rf"bad.char.bmes:{line + 2}: "):
        read_bmes(path, on_problem="error")


def test_line_numbers_count_newlines_only(tmp_path, caplog):
    path = tmp_path / "sep.char.bmes"
    path.write_text("好 S-LOC\n中\u2028 O\n\n人 X-PER\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        sentences = read_bmes(path)
    assert [s.chars for s in sentences] == [("好", "中\u2028")]
    assert "sep.char.bmes:4: " in caplog.text


@pytest.mark.parametrize(
    "record, message",
    [
        (
            '{"id": 1, "text": "北京欢迎你", "label": {"/location": {"上海": [[0, 1]]}}}',
            "reads '北京', not its mention '上海'",
        ),
        ('{"id": 2, "text": "北京欢迎你", "label": {"/location": {"北京": [[0, 9]]}}}', "outside the text"),
        (
            '{"id": 3, "text": "北京欢迎你", "label": {"/location": {"北京": [[0, 1]], "京欢": [[1, 2]]}}}',
            "overlaps",
        ),
        ('{"id": 4, "text": "北京", "label": {"/location": ["北京"]}}', 'malformed "label"'),
        ('{"id": 5, "text": "北京"', "not valid JSON"),
        ('{"id": 6, "text": "北京"}', 'no "label"'),
        ('{"id": 7, "text": "北京", "label": null}', '"label" null'),
        ('{"id": 8, "text": "北京", "label": []}', '"label" []'),
        ('{"id": 9, "text": "北京", "label": {"": {"北京": [[0, 1]]}}}', "empty category ''"),
        ('{"id": 10, "text": "北京", "label": {"/": {"北京": [[0, 1]]}}}', "empty category '/'"),
        ('{"id": 11, "text": "", "label": {}}', 'non-empty "text"'),
        ('{"id": 12, "text": "北京", "label": {"/location": {"北京": [[0.0, 1]]}}}', 'malformed "label"'),
    ],
)
def test_bad_fine_records(tmp_path, caplog, record, message):
    path = tmp_path / "dev.json"
    path.write_text('{"id": 0, "text": "你好", "label": {}}\n' + record + "\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        sentences = read_fine(path)
    assert len(sentences) == 1 and "dev.json:2: " in caplog.text and message in caplog.text
    for policy in ("refuse", "error"):
        with pytest.raises(DataError, match="dev.json:2: "):
            read_fine(path, on_problem=policy)


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
    assert to_bioes(["B-X", "I-X", "I-X", "O", "B-Y", "B-Y", "I-Y"], "bio") == (
        ["B-X", "I-X", "E-X", "O", "S-Y", "B-Y", "E-Y"],
        None,
    )
    assert to_bioes(["B-X", "M-X", "E-X", "S-Y"], "bmes") == (["B-X", "I-X", "E-X", "S-Y"], None)
    tags, note = to_bioes(["O", "I-X", "I-X", "B-Y", "I-X"], "bio")
    assert tags == ["O", "B-X", "E-X", "S-Y", "S-X"] and note.index == 1
