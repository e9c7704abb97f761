"""Decontamination of the train split: the cutting rule exactly, then the pipeline against
the reference loop on a corpus with planted contamination from the validation split and
from a task file (DirectRunner with 2 workers, and the portable runner)."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest

from mtnlg.config import ConfigError, load_config, replace
from mtnlg.extract.config import DecontaminateConfig, ExtractConfig
from mtnlg.extract.decontaminate import (NgramSet, decontaminate_document, decontaminate_text, evaluation_ngrams,
                                         frequent_ngrams, ngram_hits)

from corpus_data import COMMON_WORDS

NGRAM_TEXT = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu"  # 13 words
EXACT = DecontaminateConfig(sentence_boundaries=False)  # margins of exactly 200 characters

VOCAB = COMMON_WORDS + ("house water river garden morning letter window mountain").split()


def ngrams_of(*texts: str, ngram: int = 13, min_ngram: int = 8) -> NgramSet:
    return NgramSet.union(evaluation_ngrams(t, ngram, min_ngram) for t in texts)


def filler(n_chars: int, seed: int) -> str:
    """Words of the vocabulary, single spaces, no sentence ends: exactly ``n_chars`` long."""
    rng = random.Random(seed)
    words, total = [], 0
    while total <= n_chars:
        words.append(rng.choice(VOCAB))
        total += len(words[-1]) + 1
    text = " ".join(words)[:n_chars]
    return text[:-1] + "s" if text.endswith(" ") else text


def sentences(n_words: int, seed: int) -> str:
    """Prose of ``n_words`` words in sentences of 6 to 12 words, each ending with a full stop."""
    rng = random.Random(seed)
    words, out = 0, []
    while words < n_words:
        k = min(rng.randint(6, 12), n_words - words)
        s = " ".join(rng.choice(VOCAB) for _ in range(k))
        out.append(s[0].upper() + s[1:] + ".")
        words += k
    return " ".join(out)


# --- the rule, exactly ------------------------------------------------------------------------

@pytest.mark.unit
def test_one_match_in_the_middle_leaves_two_pieces_with_200_character_margins():
    left, right = filler(500, 1), filler(500, 2)
    text = f"{left} {NGRAM_TEXT} {right}"
    s = len(left) + 1
    e = s + len(NGRAM_TEXT)
    r = decontaminate_text(text, ngrams_of(NGRAM_TEXT), EXACT)
    assert r.matches == 1 and not r.dropped_whole
    assert text[:s - 200] + text[s - 200:e + 200] + text[e + 200:] == text
    assert r.pieces == [text[:s - 200].strip(), text[e + 200:].strip()]
    assert len(text[s - 200:s]) == 200 and len(text[e:e + 200]) == 200


@pytest.mark.unit
def test_with_sentence_boundaries_the_cut_widens_to_the_nearest_sentence_ends():
    left, right = sentences(100, 3), sentences(100, 4)
    text = f"{left} {NGRAM_TEXT} {right}"
    s = len(left) + 1
    e = s + len(NGRAM_TEXT)
    r = decontaminate_text(text, ngrams_of(NGRAM_TEXT), DecontaminateConfig())
    p = text.rfind(".", 0, s - 200)  # the last full stop before the left margin
    q = text.find(".", e + 199)      # the first at or after the right margin's last character
    assert s - (p + 1) >= 200 and (q + 1) - e >= 200
    assert r.matches == 1 and r.pieces == [text[:p + 1], text[q + 1:].strip()]
    assert r.pieces[0].endswith(".") and r.pieces[1][0].isupper()


@pytest.mark.unit
def test_no_sentence_end_before_the_margin_leaves_nothing_before_it():
    text = f"{filler(600, 5)} {NGRAM_TEXT} {sentences(120, 6)}"
    r = decontaminate_text(text, ngrams_of(NGRAM_TEXT), DecontaminateConfig())
    assert r.matches == 1 and len(r.pieces) == 1 and r.pieces[0][0].isupper()


@pytest.mark.parametrize("left_chars, kept", [(399, True), (398, False)])
@pytest.mark.unit
def test_pieces_under_200_characters_are_dropped(left_chars, kept):
    left = "x" * left_chars  # one long word: the piece before is exactly left_chars - 200 long
    text = f"{left} {NGRAM_TEXT} {filler(500, 7)}"
    r = decontaminate_text(text, ngrams_of(NGRAM_TEXT), EXACT)
    assert r.matches == 1
    assert (r.pieces[0] == "x" * 200) is kept and len(r.pieces) == (2 if kept else 1)


@pytest.mark.parametrize("matches, dropped", [(9, False), (10, True)])
@pytest.mark.unit
def test_a_document_in_more_than_10_pieces_is_dropped_whole(matches, dropped):
    segments = [filler(650, 10 + i) for i in range(matches + 1)]  # each piece 650 - 2 * 200 = 250
    text = f" {NGRAM_TEXT} ".join(segments)
    r = decontaminate_text(text, ngrams_of(NGRAM_TEXT), EXACT)
    assert r.matches == matches and r.dropped_whole is dropped
    assert len(r.pieces) == (0 if dropped else matches + 1)
    if not dropped:
        assert all(len(p) >= 200 for p in r.pieces)


@pytest.mark.unit
def test_matching_ignores_case_and_punctuation():
    ngrams = ngrams_of(NGRAM_TEXT)
    shouting = "ALPHA, Beta; gamma... DELTA-epsilon (zeta) eta/theta iota: kappa lambda MU nu!"
    body = f"{filler(400, 20)} {shouting} {filler(400, 21)}"
    assert decontaminate_text(body, ngrams, EXACT).matches == 1
    glued = body.replace("ALPHA, Beta", "ALPHABeta")  # a word less: no 13-gram in common
    assert decontaminate_text(glued, ngrams, EXACT).matches == 0
    assert decontaminate_text(glued, ngrams, EXACT).pieces == [glued]  # untouched: the text as it was
    # and the evaluation side is lowercased too
    assert decontaminate_text(f"{filler(400, 22)} {NGRAM_TEXT} {filler(400, 23)}",
                              ngrams_of(NGRAM_TEXT.upper()), EXACT).matches == 1


@pytest.mark.parametrize("run_words, margin", [(40, 200), (100, 200), (100, 202)])
@pytest.mark.unit
def test_overlapping_matches_are_cut_once_and_a_long_run_again_after_the_margin(run_words, margin):
    """A run of evaluation words holds overlapping 13-grams: the leftmost is cut with its
    margins, which take the n-grams overlapping it along; what the margin leaves of a
    longer run is matched again. Margin 202 ends inside a word: its tail is a word of the
    remaining text."""
    words = [f"e{j:03d}" for j in range(run_words)]  # word j spans [s + 5j, s + 5j + 4)
    left, right = filler(600, 30), filler(600, 31)
    text = f"{left} {' '.join(words)} {right}"
    s = len(left) + 1
    cfg = replace(EXACT, [f"margin_chars={margin}"])
    r = decontaminate_text(text, ngrams_of(" ".join(words)), cfg)
    cut_end = s + 5 * 12 + 4 + margin  # the first match: words 0-12
    j = -(-(cut_end - s) // 5)  # the first whole word after the cut
    if j + 13 <= run_words:  # a 13-gram left after the margin: cut again
        assert r.matches == 2
        cut_end = s + 5 * (j + 12) + 4 + margin
    else:
        assert r.matches == 1
    assert r.pieces == [text[:s - margin].strip(), text[cut_end:].strip()]
    assert (r.matches == 2) is (run_words == 100)


@pytest.mark.unit
def test_short_evaluation_texts_are_one_shorter_ngram():
    ten = "river garden morning letter window mountain house water little state"
    seven = "river garden morning letter window mountain house"
    assert {k: len(v) for k, v in evaluation_ngrams(ten, 13, 8).items()} == {10: 1}
    assert evaluation_ngrams(seven, 13, 8) == {}
    body = f"{filler(400, 40)} {ten.title()} {filler(400, 41)}"
    assert decontaminate_text(body, ngrams_of(ten), EXACT).matches == 1
    assert decontaminate_text(body, ngrams_of(seven), EXACT).matches == 0
    # of a 13-gram and a shorter n-gram starting at one word, the longer is cut
    both = ngrams_of(ten, "river garden morning letter window mountain house water little state good very make")
    run = "river garden morning letter window mountain house water little state good very make"
    longer = f"{filler(400, 42)} {run} {filler(400, 43)}"
    r = decontaminate_text(longer, both, EXACT)
    e = 401 + len(run)
    assert r.matches == 1 and r.pieces[1] == longer[e + 200:].strip()


@pytest.mark.unit
def test_piece_ids_and_counters():
    text = f"{filler(500, 50)} {NGRAM_TEXT} {filler(500, 51)}"
    records, counts = decontaminate_document("abcd", text, ngrams_of(NGRAM_TEXT), EXACT)
    pieces = decontaminate_text(text, ngrams_of(NGRAM_TEXT), EXACT).pieces
    assert records == [("abcd#0", pieces[0]), ("abcd#1", pieces[1])]
    piece_bytes = sum(len(p.encode()) for p in pieces)
    assert counts == {"decontaminated/documents": 1, "decontaminated/matches": 1, "decontaminated/pieces": 2,
                      "decontaminated/dropped_whole": 0, "decontaminated/emptied": 0,
                      "decontaminated/bytes_removed": len(text.encode()) - piece_bytes,
                      "kept": 1, "bytes_out": piece_bytes, "splits/train/docs": 2, "splits/train/bytes": piece_bytes}
    clean = filler(300, 52)
    assert decontaminate_document("ef", clean, ngrams_of(NGRAM_TEXT), EXACT) == (
        [("ef", clean)], {"kept": 1, "bytes_out": 300, "splits/train/docs": 1, "splits/train/bytes": 300})
    short = f"{filler(150, 53)} {NGRAM_TEXT} {filler(150, 54)}"
    assert decontaminate_document("gh", short, ngrams_of(NGRAM_TEXT), EXACT)[1]["decontaminated/emptied"] == 1


@pytest.mark.unit
def test_frequent_ngrams_are_found_by_documents_and_left_alone():
    other = "house water river garden morning letter window mountain little state good very make"
    ngrams = ngrams_of(NGRAM_TEXT, other)
    docs = [f"{filler(300, i)} {NGRAM_TEXT} {filler(300, 100 + i)} {NGRAM_TEXT}" for i in range(3)]
    docs.append(f"{filler(300, 60)} {other} {filler(300, 61)}")
    assert [sum(len(v) for v in ngram_hits(d, ngrams).values()) for d in docs] == [1, 1, 1, 1]  # distinct
    counts: dict = {}
    for d in docs:
        for k, hs in ngram_hits(d, ngrams).items():
            for h in hs.tolist():
                counts[(k, h)] = counts.get((k, h), 0) + 1
    frequent = frequent_ngrams(counts.items(), 3)
    assert len(frequent) == 1 and len(ngrams.without(frequent)) == 1
    assert decontaminate_text(docs[0], ngrams.without(frequent), EXACT).matches == 0
    assert decontaminate_text(docs[3], ngrams.without(frequent), EXACT).matches == 1


@pytest.mark.unit
def test_config_defaults_are_megatrons_and_values_are_checked():
    d = ExtractConfig().decontaminate
    assert (d.validation, d.task_files, d.ngram, d.min_ngram, d.margin_chars, d.min_piece_chars, d.max_pieces,
            d.sentence_boundaries, d.frequent_documents) == (True, [], 13, 8, 200, 200, 10, True, 0)
    cfg = load_config(ExtractConfig, None, ['decontaminate.task_files=["gs://b/lambada.jsonl", "tasks/"]',
                                            "decontaminate.text_field=passage", "decontaminate.validation=false"])
    assert cfg.decontaminate.task_files == ["gs://b/lambada.jsonl", "tasks/"] and cfg.decontaminate.enabled
    assert not replace(ExtractConfig(), ["decontaminate.validation=false"]).decontaminate.enabled
    for bad, message in [("decontaminate.ngram=0", "decontaminate.ngram"),
                         ("decontaminate.max_pieces=0", "decontaminate.max_pieces"),
                         ("decontaminate.text_field=", "decontaminate.text_field"),
                         ('decontaminate.task_files=[""]', "decontaminate.task_files"),
                         ("decontaminate.margin=100", "margin_chars")]:
        with pytest.raises(ConfigError, match=message):
            load_config(ExtractConfig, None, [bad])


# --- the pipeline against the reference loop ----------------------------------------------------

def plant(text: str, passage: str, at: float) -> str:
    """``passage`` inserted between two sentences of ``text``, at about fraction ``at`` of it."""
    cut = text.find(". ", int(len(text) * at)) + 2
    return f"{text[:cut]}{passage} {text[cut:]}"


def words_of(text: str, start: int, n: int) -> str:
    return " ".join(text.split()[start:start + n])


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """30 documents; training documents hold passages of validation documents and of a
    task file. Returns (input dir, task file, config, what is planted)."""
    from mtnlg.extract.readers import read_file, relative_names
    from mtnlg.extract.split import VALIDATION, split_of

    d = tmp_path_factory.mktemp("decontaminate-in")
    texts = [sentences(250, 1000 + i) for i in range(30)]
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = replace(ExtractConfig(), ["validation_fraction=0.2", "num_shards=2"])
    path = str(d / "docs.jsonl")
    ids = [r.id for r in read_file(path, name=relative_names([str(d)], [path])[path])]
    val = [i for i, x in enumerate(ids) if split_of(x, cfg.validation_fraction, cfg.seed) == VALIDATION]
    train = [i for i in range(30) if i not in val]
    assert len(val) >= 3 and len(train) >= 6

    tasks = [sentences(30, 2000), sentences(30, 2001), " ".join(VOCAB[-10:])]  # the last: 10 words
    task_file = tmp_path_factory.mktemp("tasks") / "task.jsonl.gz"
    task_file.write_bytes(gzip.compress("".join(json.dumps({"passage": t, "label": 0}) + "\n"
                                                for t in tasks).encode()))
    v0, v1, v2 = (texts[i] for i in val[:3])
    t = train
    texts[t[0]] = plant(texts[t[0]], words_of(v0, 40, 20).upper(), 0.5)      # 1 match, 2 pieces
    texts[t[1]] = plant(texts[t[1]], words_of(v1, 100, 16), 0.02)            # at the start: 1 piece
    texts[t[2]] = plant(texts[t[2]], words_of(tasks[0], 5, 15), 0.5)         # task file: 2 pieces
    texts[t[3]] = " ".join(sentences(150, 3000 + k) + (f" {words_of(v2, 10 * k, 14)}" if k < 11 else "")
                           for k in range(12))                               # 11 matches, 12 pieces
    short = "The end of the day and the night. " + sentences(50, 4000)  # the stop-word rule wants "the", "and"
    texts[t[5]] = plant(short, words_of(tasks[1], 0, 16), 0.5)               # short: nothing left
    texts[t[4]] = plant(texts[t[4]], tasks[2], 0.5)                          # the 10-word text
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": x}) + "\n" for x in texts))
    cfg = replace(cfg, [f"decontaminate.task_files={json.dumps([str(task_file)])}",
                        "decontaminate.text_field=passage"])
    return d, cfg


def _outputs(output: Path) -> dict[str, list[dict]]:
    return {s: sorted((json.loads(line) for f in sorted((output / s).glob("part-*.jsonl"))
                       for line in f.read_text().splitlines()), key=lambda r: r["id"])
            for s in ("train", "validation")}


def _without_files(stats: dict) -> dict:
    s = json.loads(json.dumps(stats))
    for split in s["splits"].values():
        split.pop("files")
    return s


@pytest.fixture(scope="module")
def direct_run(planted, tmp_path_factory):
    """The planted corpus through the DirectRunner on 2 worker processes: (output, stats,
    the step's log messages)."""
    import logging

    from mtnlg.extract.beam_job import extract

    d, cfg = planted
    out = tmp_path_factory.mktemp("decontaminate-out") / "direct"
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("mtnlg.extract")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        stats = extract([str(d)], str(out), cfg, workers=2)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return out, stats, [r.getMessage() for r in records]


@pytest.mark.e2e
def test_two_workers_cut_what_the_reference_loop_cuts_and_count_it_exactly(planted, direct_run):
    from mtnlg.extract.reference import extract_reference

    d, cfg = planted
    out, stats, messages = direct_run
    # every count, the decontamination's included, agreed with the committed Beam metrics
    # on the 2 workers (a difference would have rerun the step on one)
    assert any("agree with the runner's committed Beam metrics" in m for m in messages)
    assert not any("rerunning on 1 worker" in m for m in messages)
    ref_out, ref_stats = extract_reference([str(d)], None, cfg)
    assert _outputs(out) == ref_out and _without_files(stats) == _without_files(ref_stats)
    dec = stats["decontaminated"]
    assert {k: dec[k] for k in ("documents", "matches", "pieces", "dropped_whole", "emptied", "task_texts")} == {
        "documents": 6, "matches": 1 + 1 + 1 + 11 + 1 + 1, "pieces": 2 + 1 + 2 + 2, "dropped_whole": 1,
        "emptied": 1, "task_texts": 3}
    assert dec["ngrams"] == sum(len(v["text"].split()) - 12 for v in ref_out["validation"]) + 18 + 18 + 1
    assert stats["balanced"] and stats["read"] == 30
    assert stats["kept"] == 30 - 2 and stats["splits"]["train"]["docs"] == 30 - 6 - len(ref_out["validation"]) + 7
    pieces = [r["id"] for r in ref_out["train"] if "#" in r["id"]]
    assert len(pieces) == 7 and all(p.rsplit("#", 1)[1] in ("0", "1") for p in pieces)
    # no training record holds a 13-gram of a validation document or of the task file
    val_ngrams = NgramSet.union(evaluation_ngrams(v["text"], 13, 8) for v in ref_out["validation"])
    assert all(not ngram_hits(r["text"], val_ngrams) for r in ref_out["train"])


@pytest.mark.e2e
def test_the_portable_runner_writes_the_same_bytes_with_decontamination(planted, direct_run, tmp_path, caplog):
    import logging

    from mtnlg.extract.beam_job import extract

    caplog.set_level(logging.INFO, logger="mtnlg.extract")
    d, cfg = planted
    out, stats, _ = direct_run
    portable = extract([str(d)], str(tmp_path / "portable"), cfg,
                       beam_args=["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"])
    assert _without_files(portable) == _without_files(stats)
    for split in ("train", "validation"):
        for f in sorted((out / split).glob("part-*.jsonl")):
            assert (tmp_path / "portable" / split / f.name).read_bytes() == f.read_bytes()
    assert "agree with the runner's committed Beam metrics" in caplog.text


@pytest.mark.unit
def test_frequent_ngrams_in_beam_match_the_plain_functions():
    """``frequent_documents``: the Beam transform's second pass counts documents per n-gram
    as the plain functions do."""
    import apache_beam as beam
    from apache_beam.testing import test_pipeline
    from apache_beam.testing.util import assert_that, equal_to

    from mtnlg.extract.decontaminate_beam import COUNTS, Decontaminate

    other = "house water river garden morning letter window mountain little state good very make"
    validation = [("v1", "s", f"{NGRAM_TEXT} and then {other}")]
    train = [(f"t{i}", "s", f"{sentences(80, 70 + i)} {NGRAM_TEXT}. {sentences(80, 80 + i)}") for i in range(3)]
    train.append(("t9", "s", f"{sentences(120, 90)} {other}. {sentences(120, 91)}"))
    cfg = replace(ExtractConfig(), ["decontaminate.frequent_documents=3"])
    ngrams = ngrams_of(validation[0][2])
    frequent = frequent_ngrams([(kh, 3) for kh in [(13, int(h)) for h in ngram_hits(train[0][2], ngrams)[13]]], 3)
    want = []
    for doc_id, source, text in train:
        records, _ = decontaminate_document(doc_id, text, ngrams.without(frequent), cfg.decontaminate)
        want += [(i, source, t) for i, t in records]
    assert [r[0] for r in want] == ["t0", "t1", "t2", "t9#0", "t9#1"]
    with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
        out = ({"train": p | "Train" >> beam.Create(train), "validation": p | "Validation" >> beam.Create(validation)}
               | Decontaminate(cfg))
        assert_that(out["train"], equal_to(want), label="records")
        assert_that(out[COUNTS] | beam.Filter(lambda c: "decontaminated/frequent_ngrams" in c), equal_to(
            [{"decontaminated/frequent_ngrams": 1}]), label="frequent")


@pytest.mark.unit
def test_a_task_file_that_matches_nothing_fails_before_anything_is_written(tmp_path):
    from mtnlg.extract.beam_job import extract
    from mtnlg.extract.reference import extract_reference

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(sentences(80, 1))
    cfg = replace(ExtractConfig(), [f'decontaminate.task_files=["{tmp_path}/no-such-task.jsonl"]'])
    with pytest.raises(FileNotFoundError, match="decontaminate.task_files.*no-such-task"):
        extract([str(tmp_path / "in")], str(tmp_path / "out"), cfg)
    assert not (tmp_path / "out").exists()
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"other": 1}\n')
    cfg = replace(ExtractConfig(), [f'decontaminate.task_files=["{tmp_path}/bad.jsonl"]'])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing_text_field"):
        extract_reference([str(tmp_path / "in")], None, cfg)


@pytest.mark.unit
def test_ngram_sets_are_sorted_unique_and_membership_is_exact():
    a = NgramSet({13: np.array([5, 3, 3, 9], dtype=np.uint64)})
    assert a.by_length[13].tolist() == [3, 5, 9] and len(a) == 3 and a.lengths == (13,)
    assert a.contains(13, np.array([1, 3, 9, 10], dtype=np.uint64)).tolist() == [False, True, True, False]
    assert a.contains(8, np.array([3], dtype=np.uint64)).tolist() == [False]
    assert not NgramSet() and len(NgramSet.union([{13: np.array([1], np.uint64)}, {13: np.array([1], np.uint64)}])) == 1


@pytest.mark.unit
def test_decontamination_counts_that_disagree_with_the_runners_metrics_are_named():
    from mtnlg.extract.beam_job import disagreements
    from mtnlg.extract.stats import build_stats

    stats = build_stats({"read": 2, "kept": 1, "splits/train/docs": 2, "decontaminated/documents": 2,
                         "decontaminated/matches": 3, "decontaminated/pieces": 2, "decontaminated/emptied": 1},
                        inputs=["in"], files=1, skipped=[])
    assert stats["balanced"]
    metrics = {"docs_read": 2, "kept_train": 2, "decontaminated_documents": 2, "decontaminated_matches": 2,
               "decontaminated_pieces": 2, "decontaminated_emptied": 1}
    assert [w for w in disagreements(stats, metrics) if w.startswith("decontaminated")] == [
        "decontaminated.matches: 3 in stats.json, 2 in the metrics"]
