"""End-to-end runs of the extract step: every kind of bad input, gs://, the CLI, worker counts.

Inputs are small real documents from the bundled corpus plus crafted bad files, so each
run takes a second or two; one run uses 2 worker processes and is compared with the
single-process reference loop.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mtnlg import storage
from mtnlg.cli import main as cli_main
from mtnlg.config import replace
from mtnlg.extract.beam_job import extract, run
from mtnlg.extract.config import ExtractConfig
from mtnlg.extract.reference import extract_reference

pytestmark = pytest.mark.e2e

CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus" / "python-docs"
GOOD = ["tutorial/classes.html.gz", "tutorial/errors.html.gz", "tutorial/controlflow.html.gz",
        "howto/sorting.html.gz", "faq/general.html.gz"]
SHARD = re.compile(r"part-\d{5}-of-\d{5}\.jsonl$")


def corpus_text(name: str) -> str:
    return gzip.decompress((CORPUS / name).read_bytes()).decode("utf-8")


def read_outputs(output: str) -> dict[str, list[dict]]:
    out = {}
    for split in ("train", "validation"):
        files = storage.list_files(storage.join(output, split))
        assert files and all(SHARD.search(f) for f in files), files
        out[split] = sorted((json.loads(line) for f in files for line in storage.read_text(f).splitlines()),
                            key=lambda r: r["id"])
    return out


def comparable(stats: dict) -> dict:
    """Stats without the fields that name output files."""
    s = json.loads(json.dumps(stats))
    for split in s["splits"].values():
        split.pop("files")
    return s


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory) -> Path:
    """Good documents, an exact and a fuzzy duplicate, and every kind of bad input."""
    d = tmp_path_factory.mktemp("extract-in")
    (d / "html").mkdir()
    for name in GOOD:
        shutil.copyfile(CORPUS / name, d / "html" / name.replace("/", "-"))
    whatsnew = corpus_text("whatsnew/3.2.txt.gz")
    (d / "text").mkdir()
    (d / "text" / "whatsnew.txt").write_text(whatsnew)
    # Exact duplicate: same text, other case and spacing; near duplicate: a few words changed.
    (d / "text" / "whatsnew-shouting.txt.gz").write_bytes(gzip.compress(whatsnew.upper().replace(" ", "  ").encode()))
    words = whatsnew.split(" ")
    rng = random.Random(0)
    for i in rng.sample(range(len(words)), 15):
        words[i] = "edited"
    (d / "text" / "whatsnew-edited.txt").write_text(" ".join(words))
    # Invalid UTF-8 inside an otherwise good document: replaced and counted.
    (d / "text" / "latin1.txt").write_bytes(corpus_text("whatsnew/3.3.txt.gz")[:20000].encode() + b"caf\xe9 \xff")
    # JSONL: good records, a line that is not JSON, a record without the text field.
    paragraphs = [p for p in corpus_text("whatsnew/3.4.txt.gz").split("\n\n") if len(p.split()) > 60][:6]
    lines = [json.dumps({"text": p, "n": i}) for i, p in enumerate(paragraphs)]
    lines[2:2] = ["{this is not json", json.dumps({"body": "no text field"}), ""]
    (d / "docs.jsonl").write_text("\n".join(lines) + "\n")
    # The bad files.
    bad = d / "bad"
    bad.mkdir()
    (bad / "empty.txt").write_bytes(b"")
    (bad / "blank.jsonl").write_bytes(b"\n \n")
    (bad / "binary.txt").write_bytes(random.Random(1).randbytes(20000))
    (bad / "nul.txt").write_bytes(whatsnew[:5000].encode() + b"\x00" + whatsnew[5000:10000].encode())
    (bad / "truncated.txt.gz").write_bytes(gzip.compress(whatsnew.encode())[:500])
    (bad / "not-gzip.jsonl.gz").write_bytes(b'{"text": "plain text, named .gz"}\n')
    (bad / "one-line-50mb.txt").write_bytes(b"word " * (10 << 20))  # 50 MiB, no newline
    os.symlink(str(bad / "deleted.txt"), str(bad / "dangling.txt"))  # listed, cannot be opened
    (bad / "README.md").write_text("not an input format: skipped and listed")
    # Documents that read well but break a quality rule each: dropped, and counted under it.
    (d / "rules.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                           for texts in rule_breakers().values() for t in texts))
    return d


PROSE = ("The list type supports append and pop, and a dictionary maps keys to values that have to be "
         "hashable with the usual rules of the language and its standard library").split()


def rule_breakers() -> dict[str, list[str]]:
    """Texts that break one quality rule each (the first they break, in RULES order)."""
    rng = random.Random(2)

    def words(n: int, vocab: list[str] = PROSE) -> str:
        return " ".join(rng.choice(vocab) for _ in range(n))

    no_stop_words = [w for w in PROSE if w.lower() not in ("the", "be", "to", "of", "and", "that", "have", "with")]
    return {
        "min_words": ["The list type keeps its items in order and has to be sorted with care.",
                      "A short note that is kept out of the corpus."],
        "mean_word_length": [" ".join(["a", "to", "of", "an", "be", "it"] * 12)],
        "alpha_words": [" ".join(f"{rng.randint(1000, 99999)} {rng.randint(1000, 99999)} value" for _ in range(25))],
        "symbol_ratio": [" ".join("#" + w for w in words(60).split())],
        "bullet_lines": ["\n".join("- " + words(8) for _ in range(12))],
        "ellipsis_lines": ["\n".join(words(14) + "..." for _ in range(8))],
        "duplicate_lines": ["\n".join([words(10)] * 8 + [words(10), words(10)])],
        "duplicate_line_chars": ["\n".join([words(6) for _ in range(8)] + [words(40)] * 3)],
        "stop_words": [words(80, no_stop_words)],
    }


EXPECTED_DROPPED = {"min_words": 2, "max_words": 0, "mean_word_length": 1, "alpha_words": 1, "symbol_ratio": 1,
                    "bullet_lines": 1, "ellipsis_lines": 1, "duplicate_lines": 1, "duplicate_line_chars": 1,
                    "stop_words": 1, "language": 0, "quality_classifier": 0}
EXPECTED_FAILED = {"unreadable": 1, "corrupt_gzip": 2, "binary": 1, "nul_byte": 1, "too_large": 1, "empty": 2,
                   "invalid_json": 1, "missing_text_field": 1, "invalid_html": 0}


def test_end_to_end_every_bad_input_two_workers(bad_corpus, tmp_path):
    out = str(tmp_path / "out")
    stats = run(["--input", str(bad_corpus), "--output", out, "--set", "validation_fraction=0.3",
                 "--workers", "2"])
    assert stats["failed"] == EXPECTED_FAILED
    assert stats["failed_examples"]["too_large"][0].endswith("one-line-50mb.txt: over max_doc_bytes=8388608")
    assert stats["dropped"] == EXPECTED_DROPPED == {r: len(t) for r, t in rule_breakers().items()} | {
        "max_words": 0, "language": 0, "quality_classifier": 0}
    assert stats["duplicates"] == {"exact": 1, "fuzzy": 1}
    assert stats["skipped_files"] == {"count": 1, "examples": [str(bad_corpus / "bad" / "README.md")]}
    assert stats["invalid_utf8_replacements"] == 2
    good_docs = len(GOOD) + 4 + 6  # html pages, 4 text files, 6 JSONL records
    assert stats["read"] == good_docs + sum(EXPECTED_DROPPED.values()) + sum(EXPECTED_FAILED.values()) == 35
    assert stats["kept"] == good_docs - 2  # every good document but the two duplicates
    assert stats["read"] == (stats["kept"] + sum(stats["dropped"].values()) + sum(stats["duplicates"].values())
                             + sum(stats["failed"].values()))
    assert stats["balanced"]

    outputs = read_outputs(out)
    assert {s: len(v) for s, v in outputs.items()} == {s: stats["splits"][s]["docs"] for s in outputs}
    assert all(outputs.values())  # both splits hold documents
    for split, recs in outputs.items():
        assert sum(len(r["text"].encode()) for r in recs) == stats["splits"][split]["bytes"]
        assert all(set(r) == {"id", "text", "source"} for r in recs)
    sources = {r["source"].rsplit("/", 1)[-1] for recs in outputs.values() for r in recs}
    # The original, its exact and its near duplicate: one group, one document kept.
    assert len(sources & {"whatsnew.txt", "whatsnew-shouting.txt.gz", "whatsnew-edited.txt"}) == 1
    assert json.loads(storage.read_text(os.path.join(out, "stats.json"))) == stats

    # Two worker processes give exactly what the single-process reference loop gives.
    cfg = replace(ExtractConfig(), ["validation_fraction=0.3"])
    ref_out, ref_stats = extract_reference([str(bad_corpus)], None, cfg)
    assert outputs == ref_out
    assert comparable(stats) == comparable(ref_stats)


def test_nothing_readable_is_a_clear_error(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_bytes(b"")
    (tmp_path / "in" / "b.txt.gz").write_bytes(b"garbage")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"nothing could be read.*corrupt_gzip=1, empty=1"):
        extract([str(tmp_path / "in")], str(out), beam_args=["--direct_num_workers=1"])
    assert json.loads((out / "stats.json").read_text())["read"] == 2  # still written, for inspection
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.md").write_text("x")
    with pytest.raises(ValueError, match="no file of a known format"):
        extract([str(tmp_path / "other")], str(out))
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        extract([str(tmp_path / "no-such-dir")], str(out))


def test_gcs_input_and_output(gcs, tmp_path):
    for name in GOOD[:3]:
        storage.copy(str(CORPUS / name), f"{gcs}/in/{name}")
    storage.write_bytes(f"{gcs}/in/broken.txt.gz", b"not gzip")
    storage.write_text(f"{gcs}/in/docs.jsonl", json.dumps({"text": corpus_text("whatsnew/3.5.txt.gz")[:30000]}) + "\nbad\n")
    stats = extract([f"{gcs}/in"], f"{gcs}/out", replace(ExtractConfig(), ["validation_fraction=0.5", "num_shards=1"]),
                    workers=1)
    assert stats["read"] == 6 and stats["failed"]["corrupt_gzip"] == 1 and stats["failed"]["invalid_json"] == 1
    assert stats["kept"] == 4 and stats["balanced"]
    assert stats["splits"]["train"]["files"] == [f"{gcs}/out/train/part-00000-of-00001.jsonl"]
    assert json.loads(storage.read_text(f"{gcs}/out/stats.json")) == stats
    outputs = read_outputs(f"{gcs}/out")
    # one source per document: a training document cut by decontamination writes pieces of one source
    assert sorted({r["source"].split("/in/", 1)[1] for v in outputs.values() for r in v}) == sorted(
        GOOD[:3] + ["docs.jsonl:1"])


def test_cli(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for name in GOOD[:2]:
        shutil.copyfile(CORPUS / name, src / name.replace("/", "-"))
    out = tmp_path / "out"
    rc = cli_main(["extract", str(src / "*.html.gz"), "--output", str(out), "num_shards=3", "filters.min_words=10",
                   "--workers", "1", "--", "--direct_num_workers=1"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "read 2, kept 2" in stdout
    assert sorted(os.listdir(out / "train")) == [f"part-0000{i}-of-00003.jsonl" for i in range(3)]
    # A second run into the same directory replaces the earlier shards, not adds to them.
    assert cli_main(["extract", str(src), "-o", str(out), "num_shards=1", "--workers", "1"]) == 0
    assert sorted(os.listdir(out / "train")) == ["part-00000-of-00001.jsonl"]
    capsys.readouterr()
    assert cli_main(["extract", str(src), "-o", str(out), "dedup.threshold=2"]) == 2
    assert "dedup.threshold: must be <= 1" in capsys.readouterr().err
    assert cli_main(["extract", str(tmp_path / "missing"), "-o", str(out)]) == 1
    assert "matches no file" in capsys.readouterr().err
    assert cli_main(["extract", str(src), "-o", str(out), "--print-config", "seed=5"]) == 0
    assert "seed: 5" in capsys.readouterr().out


def test_output_files_are_byte_identical_across_worker_counts_and_locations(tmp_path):
    """Shards are assigned by id hash and sorted, and ids do not depend on where the data
    lies, so the files (and everything made from them) are reproducible."""
    corpus = Path(__file__).resolve().parent.parent / "data" / "corpus" / "python-docs" / "faq"
    copies = [tmp_path / "a" / "faq", tmp_path / "b" / "deeper" / "faq"]
    for c in copies:
        shutil.copytree(corpus, c)
    files = {}
    for workers, src in ((1, copies[0]), (2, copies[1])):
        out = tmp_path / f"out{workers}"
        run(["--input", str(src), "--output", str(out), "--set", "validation_fraction=0.3", "--workers",
             str(workers)])
        files[workers] = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob("*/part-*"))}
    assert files[1].keys() == files[2].keys() and len(files[1]) >= 2
    for name in files[1]:  # the same bytes, apart from the 'source' path that names the copy
        assert files[1][name].replace(str(copies[0]).encode(), b"X") == \
            files[2][name].replace(str(copies[1]).encode(), b"X"), name


def test_the_portable_runner_writes_the_same_bytes(tmp_path, caplog):
    """The whole extract on Beam's PortableRunner with the embedded job service and a
    LOOPBACK environment (the portable-pipeline protocol that Flink's and Spark's job servers
    receive) writes what the DirectRunner writes, byte for byte."""
    import logging

    caplog.set_level(logging.INFO, logger="mtnlg.extract")
    from corpus_data import whatsnew_paragraphs

    from mtnlg.extract.neardup import make_corpus, originals_from

    src = tmp_path / "in"
    shutil.copytree(CORPUS / "faq", src)
    (src / "docs.jsonl").write_text(json.dumps({"text": corpus_text("whatsnew/3.5.txt.gz")[:30000]}) + "\nbad\n")
    # near-duplicate groups, so that the grouping has real work on both runners
    make_corpus(originals_from(whatsnew_paragraphs(max_files=2))[:60], str(src / "neardup"), seed=1)
    (src / "neardup" / "truth.json").unlink()
    out = tmp_path / "out"

    def run(*beam_args: str) -> dict[str, bytes]:
        assert cli_main(["extract", str(src), "--output", str(out), "--workers", "1", "--", *beam_args]) == 0
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    direct = run()
    portable = run("--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK")
    assert sorted(portable) == sorted(direct) and "stats.json" in direct
    assert [n for n in direct if portable[n] != direct[n]] == []
    stats = json.loads(direct["stats.json"])
    assert stats["failed"]["invalid_json"] == 1 and stats["balanced"]
    # on both runners every count was checked against the committed Beam metrics
    assert caplog.text.count("agree with the runner's committed Beam metrics") == 2
    assert stats["duplicates"]["fuzzy"] >= 20 and stats["fuzzy"]["unconverged_nodes"] == 0
    # ... and both drop what union-find over the same pairs drops
    assert stats["duplicates"] == extract_reference([str(src)], None, ExtractConfig())[1]["duplicates"]


def test_fuzzy_dedup_recall_and_precision_on_known_near_duplicates(tmp_path):
    """On a corpus with known near-duplicate groups (real text, deterministic edits; the
    truth from exact Jaccard similarity of the shingle sets), fuzzy deduplication drops
    what it should: recall >= 0.95 and precision >= 0.99 at Jaccard 0.8, and keeps the
    related-but-different variants (10-25% of the words changed)."""
    from corpus_data import whatsnew_paragraphs

    from mtnlg.extract.config import RULES
    from mtnlg.extract.neardup import kept_ids, make_corpus, originals_from, score

    corpus = make_corpus(originals_from(whatsnew_paragraphs())[:300], str(tmp_path / "neardup"), seed=0)
    (tmp_path / "neardup" / "truth.json").unlink()
    assert len(corpus.docs) > 500 and len(corpus.should_drop) > 200
    assert {d["kind"] for d in corpus.docs.values()} == {"original", "boilerplate", "substitute", "shuffle",
                                                        "mixed", "far"}
    # decontamination off: it would cut the near-duplicates of validation documents out of
    # the train split, and the score counts whole documents
    cfg = replace(ExtractConfig(), [f"filters.disabled={json.dumps(list(RULES))}", "validation_fraction=0.1",
                                    "decontaminate.validation=false"])
    stats = extract([str(tmp_path / "neardup")], str(tmp_path / "out"), cfg, workers=1)
    s = score(corpus, kept_ids([str(tmp_path / "out" / "train"), str(tmp_path / "out" / "validation")]))
    assert s["dropped"] == stats["duplicates"]["exact"] + stats["duplicates"]["fuzzy"]
    assert s["recall"] >= 0.95 and s["precision"] >= 0.99, s
    # the pairs, the largest bucket and group are what the single-process loop counts
    _, ref = extract_reference([str(tmp_path / "neardup")], None, cfg)
    assert stats["fuzzy"] == ref["fuzzy"] and stats["duplicates"] == ref["duplicates"]
    assert "reruns" not in stats  # near-duplicate groups converge within the first attempt's rounds
    f = stats["fuzzy"]
    assert f["pairs_checked"] >= f["pairs_similar"] >= stats["duplicates"]["fuzzy"] > 200
    assert 2 <= f["largest_group"] <= 8 and 2 <= f["largest_bucket"] <= 8, f
    assert s["far_variants_kept"] >= 0.95, s
    # near the threshold the MinHash estimate (128 values, sd ~0.035) misses some pairs
    by_j = s["recall_by_jaccard"]
    assert by_j["0.80-0.85"]["recall"] >= 0.8 and by_j["0.85-0.90"]["recall"] >= 0.95, by_j


def test_groups_that_need_more_rounds_are_rerun_with_max_rounds(tmp_path, monkeypatch):
    """A chain of near-duplicates laid out in ascending id order (the slowest to group) is
    not grouped in the first attempt's rounds: the job reruns with ``dedup.max_rounds``,
    names the first attempt in stats.json, and drops what union-find over the same pairs
    drops."""
    from mtnlg.extract import beam_job
    from mtnlg.extract.config import RULES
    from mtnlg.extract.readers import read_file, relative_names

    monkeypatch.setattr(beam_job, "FIRST_ROUNDS", 1)
    rng = random.Random(5)
    texts = [" ".join(f"w{rng.randrange(400)}" for _ in range(400))]
    for _ in range(11):  # each a near-duplicate of the one before (6 words changed), not of the others
        words = texts[-1].split()
        for i in rng.sample(range(len(words)), 6):
            words[i] = f"x{rng.randrange(10**9)}"
        texts.append(" ".join(words))
    src = tmp_path / "in"
    src.mkdir()
    path = src / "chain.jsonl"
    path.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(len(texts))))
    name = relative_names([str(src)], [str(path)])[str(path)]
    ids = [d.id for d in read_file(str(path), name=name)]
    by_id = {line: texts[rank] for rank, line in enumerate(sorted(range(len(ids)), key=ids.__getitem__))}
    path.write_text("".join(json.dumps({"text": by_id[i]}) + "\n" for i in range(len(texts))))
    cfg = replace(ExtractConfig(), [f"filters.disabled={json.dumps(list(RULES))}", "decontaminate.validation=false",
                                    "dedup.max_rounds=8"])

    stats = extract([str(src)], str(tmp_path / "out"), cfg, workers=1)
    assert stats["reruns"][0]["rounds"] == 1 and stats["reruns"][0]["unconverged_nodes"] > 0, stats["reruns"]
    assert len(stats["reruns"]) == 1 and stats["fuzzy"]["unconverged_nodes"] == 0
    _, ref = extract_reference([str(src)], None, cfg)
    assert stats["duplicates"] == ref["duplicates"] and stats["duplicates"]["fuzzy"] >= 8
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == stats


def test_marks_lost_on_their_way_to_the_join_stop_the_run(tmp_path, monkeypatch):
    """Both kinds of duplicate mark are counted where they are made, before the join with
    the documents: a join that loses marks (here: every fuzzy one) keeps documents it should
    drop, and the run fails naming the count, instead of writing them."""
    from corpus_data import whatsnew_paragraphs

    from apache_beam.pvalue import TaggedOutput

    from mtnlg.extract.beam.common import DUPLICATES
    from mtnlg.extract.beam.write import DropDuplicatesFn
    from mtnlg.extract.config import RULES
    from mtnlg.extract.neardup import make_corpus, originals_from

    make_corpus(originals_from(whatsnew_paragraphs())[:40], str(tmp_path / "neardup"), seed=0)
    (tmp_path / "neardup" / "truth.json").unlink()
    cfg = replace(ExtractConfig(), [f"filters.disabled={json.dumps(list(RULES))}"])
    good = extract([str(tmp_path / "neardup")], str(tmp_path / "good"), cfg, workers=1)
    assert good["duplicates"]["fuzzy"] > 5

    def losing_join(self, joined):
        doc_id, groups = joined
        marks = [m for m in groups["dup"] if m != "fuzzy"]
        for source, text in groups["doc"]:
            yield TaggedOutput(DUPLICATES, marks[0]) if marks else (doc_id, source, text)

    monkeypatch.setattr(DropDuplicatesFn, "process", losing_join)
    with pytest.raises(RuntimeError, match=rf"duplicates.fuzzy: 0 in stats.json, {good['duplicates']['fuzzy']} "
                                           r"in the metrics"):
        extract([str(tmp_path / "neardup")], str(tmp_path / "lost"), cfg, workers=1)


def test_counts_that_disagree_on_local_worker_processes_rerun_on_one_worker(tmp_path, monkeypatch, caplog):
    """When the counts disagree on the local multi-process runner, the step reruns on one
    in-process worker and returns that run's (agreeing) counts; elsewhere it fails."""
    from mtnlg.extract import beam_job

    for f in GOOD[:3]:
        shutil.copy(CORPUS / f, tmp_path / Path(f).name)
    real, calls = beam_job._run_once, []

    def first_run_disagrees(args, *rest):
        stats, wrong = real(args, *rest)
        calls.append(args)
        return stats, (["duplicates.exact: 0 in stats.json, 1 in the metrics"] if len(calls) == 1 else wrong)

    monkeypatch.setattr(beam_job, "_run_once", first_run_disagrees)
    with caplog.at_level("WARNING", logger="mtnlg.extract"):
        stats = extract([str(tmp_path / "classes.html.gz")], str(tmp_path / "out"), workers=2)
    assert "--direct_running_mode=multi_processing" in calls[0] and "--direct_num_workers=2" in calls[0]
    assert len(calls) == 2 and calls[1][-2:] == ["--direct_num_workers=1", "--direct_running_mode=in_memory"]
    assert "on 2 local worker processes the counts disagree" in caplog.text and "duplicates.exact: 0" in caplog.text
    assert stats["kept"] > 0 and json.loads((tmp_path / "out" / "stats.json").read_text()) == stats
    # the failing attempt is kept, to compare with the rerun's output, and named in stats.json
    kept = tmp_path / "out.attempt-1"
    assert stats["reruns"] == [{"workers": 2, "disagreements": ["duplicates.exact: 0 in stats.json, 1 in the metrics"],
                                "kept_in": str(kept)}]
    assert json.loads((kept / "disagreements.json").read_text()) == stats["reruns"][0]["disagreements"]
    first = json.loads((kept / "stats.json").read_text())
    assert first["kept"] == stats["kept"] and "reruns" not in first
    assert sorted(p.name for p in (kept / "train").iterdir()) == sorted(p.name for p in (tmp_path / "out" / "train")
                                                                          .iterdir())

    calls.clear()
    with pytest.raises(RuntimeError, match="duplicates.exact: 0 in stats.json, 1 in the metrics"):
        extract([str(tmp_path / "classes.html.gz")], str(tmp_path / "out1"), workers=1)
    assert len(calls) == 1


def test_counts_that_disagree_with_the_runners_metrics_are_named():
    from mtnlg.extract.beam_job import disagreements
    from mtnlg.extract.stats import build_stats

    stats = build_stats({"read": 5, "files_read": 1, "bytes_in": 900, "kept": 3, "splits/train/docs": 3,
                         "dropped/min_words": 1, "duplicates/exact": 1}, inputs=["x"], files=1, skipped=[])
    metrics = {"docs_read": 5, "files_read": 1, "bytes_in": 900, "kept_train": 3, "dropped_min_words": 1,
               "duplicates_exact": 1}
    assert disagreements(stats, metrics) == []
    assert disagreements(stats, {**metrics, "duplicates_exact": 2, "failed_binary": 1}) == [
        "duplicates.exact: 1 in stats.json, 2 in the metrics", "failed.binary: 0 in stats.json, 1 in the metrics",
        "read: 5 in stats.json, 6 in the metrics"]
    # The marks that reached the join say on which side of it a mark went missing.
    assert disagreements(stats, {**metrics, "marks_joined": 1, "marks_without_document": 0}) == []
    assert disagreements(stats, {**metrics, "marks_joined": 1, "marks_without_document": 1}) == [
        "duplicate marks: 1 made, 1 reached the documents' join, 1 of them without their document"]
    assert disagreements(stats, {**metrics, "duplicates_exact": 2, "marks_joined": 1})[-1] == (
        "duplicate marks: 2 made, 1 reached the documents' join, 0 of them without their document")


def test_the_local_worker_processes_start_quietly(tmp_path):
    """Each local worker process (2 here) imports Beam before any option reaches it: it is
    started as mtnlg.extract.beam.worker, whose filter is in place first, so the step's
    output has neither the BigQuery notice nor the workers' start-up lines."""
    corpus = Path(__file__).resolve().parent.parent / "data" / "corpus" / "python-docs" / "faq"
    p = subprocess.run([sys.executable, "-m", "mtnlg.cli", "extract", str(corpus), "--output", str(tmp_path / "out"),
                        "--workers", "2"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    said = p.stdout + p.stderr
    assert "read 9, kept" in said
    for notice in ("apitools not found", "Logging handler created", "semi_persistent_directory"):
        assert notice not in said, notice
