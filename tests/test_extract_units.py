"""Unit tests of the extract step's pieces: cleaning, readers, rules, MinHash/LSH, split, config."""

from __future__ import annotations

import gzip
import json
import os
import random

import numpy as np
import pytest

from mtnlg.config import ConfigError, load_config
from mtnlg.extract import stats as st
from mtnlg.extract.clean import clean_text, decode_utf8, normalize_for_hash
from mtnlg.extract.config import RULES, ExtractConfig, FilterConfig
from mtnlg.extract.dedup import MinHasher, band_keys, candidate_pairs, components, jaccard_estimate, text_hash
from mtnlg.extract.filters import first_failing_rule, language_confidence
from mtnlg.extract.readers import Document, Failure, detect_format, expand_inputs, html_to_text, read_file
from mtnlg.extract.split import split_of

pytestmark = pytest.mark.unit

PROSE = ("The quick brown fox jumps over the lazy dog while the farmer watches from the porch. "
         "It is a story that children have heard with delight, and one that their parents tell to them "
         "again and again at the end of a long day of work in the fields and barns of the valley. ")


GERMAN = ("Der schnelle braune Fuchs springt über den faulen Hund, während der Bauer von der Veranda "
          "aus zusieht. Es ist eine Geschichte, die Kinder mit Freude gehört haben, und eine, die ihre "
          "Eltern ihnen am Ende eines langen Arbeitstages auf den Feldern und in den Scheunen des Tals "
          "immer wieder erzählen. Niemand weiß genau, woher sie stammt, aber jeder kennt sie. ") * 2


def words(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    vocab = PROSE.split()
    return " ".join(rng.choice(vocab) for _ in range(n))


# --- cleaning ----------------------------------------------------------------------------

def test_decode_counts_only_invalid_sequences():
    assert decode_utf8("naïve \ufffd".encode()) == ("naïve \ufffd", 0)  # a real U+FFFD is text
    text, replaced = decode_utf8(b"ok \xff\xfe and \xc3 end")
    assert replaced == 3 and text.count("\ufffd") == 3 and text.startswith("ok ")


def test_clean_text_nfc_controls_whitespace():
    decomposed = "Cafe\u0301"  # e + combining acute
    out = clean_text(f"  {decomposed}\u00a0\t au\x07 lait\u200b \r\n\r\n\r\n\nnext\u2028line \x00 ")
    assert out == "Café au lait\n\nnext\nline"
    # A combining mark separated from its base by a removed control still composes.
    assert clean_text("e\x01\u0301") == "é"
    assert clean_text("a\x85b\ufeffc") == "abc"


def test_normalize_for_hash_ignores_case_and_spacing():
    assert normalize_for_hash("Hello   World\n\nAgain") == normalize_for_hash("hello world again")
    assert text_hash("Hello  World") == text_hash("hello world")
    assert text_hash("hello world") != text_hash("hello world!")


# --- readers ------------------------------------------------------------------------------

def test_detect_format():
    assert detect_format("a/b.txt") == "text"
    assert detect_format("gs://b/x.JSONL.gz") == "jsonl"
    assert detect_format("page.htm") == "html"
    assert detect_format("d.json") == "jsonl"
    assert detect_format("README.md") is None
    assert detect_format("archive.gz") is None
    assert detect_format(".txt") is None


def test_html_to_text_drops_navigation_scripts_styles():
    html = """<html><head><title>T</title><style>p{}</style><script>var x = 1;</script></head><body>
      <nav><a href="/">Home</a></nav><header>Site header</header>
      <div class="sphinxsidebar" role="navigation"><ul><li>Sidebar link</li></ul></div>
      <div role="main"><h1>Title<a class="headerlink" href="#t">\u00b6</a></h1>
      <p>First &amp; <b>bold</b> para<br>graph.</p><img src="x.png"><ul><li>one</li><li>two</li></ul>
      <pre>code  line</pre></div><footer>Copyright</footer><script>tracker()</script></body></html>"""
    text = clean_text(html_to_text(html))
    assert text == "Title\n\nFirst & bold para\ngraph.\n\none\n\ntwo\n\ncode line"
    for hidden in ("Home", "Site header", "Sidebar", "Copyright", "var x", "tracker", "p{}", "\u00b6", "T\n"):
        assert hidden not in text


def test_html_unclosed_and_stray_tags():
    text = clean_text(html_to_text("<div><p>one<p>two</div></span><script>x</div>gone"))
    assert text == "one\ntwo"  # an unclosed <script> hides the rest, stray end tags close nothing


def _write(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def test_read_file_each_failure_reason(tmp_path):
    d = str(tmp_path)
    good = (PROSE * 2).encode()
    cases = {
        "empty": _write(f"{d}/empty.txt", b""),
        "binary": _write(f"{d}/image.txt", random.Random(0).randbytes(4000)),
        "nul_byte": _write(f"{d}/nul.txt", good + b"\x00" + good),
        "too_large": _write(f"{d}/big.txt", b"x" * 2000),
        "corrupt_gzip": _write(f"{d}/trunc.txt.gz", gzip.compress(good * 50)[:60]),
    }
    _write(f"{d}/notgz.html.gz", b"<html>plain, not gzip</html>")
    cases_gz = "corrupt_gzip"
    os.symlink(f"{d}/nowhere.txt", f"{d}/dangling.txt")
    for reason, path in cases.items():
        (rec,) = list(read_file(path, max_doc_bytes=1000 if reason == "too_large" else 1 << 20))
        assert isinstance(rec, Failure) and rec.reason == reason, (reason, rec)
    (rec,) = list(read_file(f"{d}/notgz.html.gz"))
    assert rec.reason == cases_gz
    (rec,) = list(read_file(f"{d}/dangling.txt"))
    assert rec.reason == "unreadable" and "No such file" in rec.detail


def test_read_jsonl_lines(tmp_path):
    lines = [b'{"text": "first doc", "x": 1}', b"", b"not json {", b'{"body": "no text field"}',
             b'{"text": 42}', b'["a list"]', b'{"text": "' + b"y" * 500 + b'"}', b'{"text": "bad \xff utf8"}',
             b'{"text": "nul\x00"}', b'{"text": "last, no newline"}']
    path = _write(f"{tmp_path}/d.jsonl.gz", gzip.compress(b"\n".join(lines)))
    recs = list(read_file(path, max_doc_bytes=200))
    got = [(r.reason if isinstance(r, Failure) else r.text) for r in recs]
    assert got == ["first doc", "invalid_json", "missing_text_field", "missing_text_field", "missing_text_field",
                   "too_large", "bad \ufffd utf8", "nul_byte", "last, no newline"]
    assert [r.source.rsplit(":", 1)[1] for r in recs] == ["1", "3", "4", "5", "6", "7", "8", "9", "10"]
    assert recs[6].replaced == 1 and isinstance(recs[0], Document)
    assert len({r.id for r in recs if isinstance(r, Document)}) == 3
    # A gzip damaged part-way keeps the records before the damage and counts the rest once.
    whole = gzip.compress(b"\n".join(b'{"text": "doc %d %s"}' % (i, os.urandom(8).hex().encode())
                                     for i in range(30000)))
    path = _write(f"{tmp_path}/cut.jsonl.gz", whole[: len(whole) // 2])
    recs = list(read_file(path))
    assert recs[-1].reason == "corrupt_gzip" and all(isinstance(r, Document) for r in recs[:-1])
    assert 1000 < len(recs) < 30000
    assert list(read_file(_write(f"{tmp_path}/blank.jsonl", b"\n\n  \n")))[0].reason == "empty"


def test_a_small_gzip_cut_short_keeps_what_zcat_gives_back(tmp_path):
    """A .jsonl.gz cut mid-stream (smaller than one read) keeps every whole record before
    the cut, as zcat would, and counts the cut once; a cut whole-file document is a failure."""
    import zlib

    lines = [b'{"text": "record %d about lists and dicts"}' % i for i in range(200)]
    whole = gzip.compress(b"\n".join(lines) + b"\n")
    cut = whole[: len(whole) * 2 // 3]
    decoded = zlib.decompressobj(31).decompress(cut)           # what zcat prints before its error
    expected = [json.loads(ln)["text"] for ln in decoded.split(b"\n")[:-1]]
    assert 20 < len(expected) < 200
    recs = list(read_file(_write(f"{tmp_path}/cut.jsonl.gz", cut)))
    docs = [r for r in recs if isinstance(r, Document)]
    fails = [r for r in recs if isinstance(r, Failure)]
    assert [d.text for d in docs] == expected
    assert [f.reason for f in fails] == ["corrupt_gzip"] and fails[0].source.endswith(f":{len(expected) + 1}")
    # several gzip members one after another (as `cat a.gz b.gz`) read as one stream
    two = gzip.compress(b"\n".join(lines[:3]) + b"\n") + gzip.compress(b"\n".join(lines[3:6]) + b"\n")
    assert len([r for r in read_file(_write(f"{tmp_path}/two.jsonl.gz", two)) if isinstance(r, Document)]) == 6
    # a text file cut short is one failure, not half a document
    text = gzip.compress(b"A paragraph about lists. " * 400)
    (only,) = list(read_file(_write(f"{tmp_path}/cut.txt.gz", text[: len(text) // 2])))
    assert isinstance(only, Failure) and only.reason == "corrupt_gzip"


def test_expand_inputs_skips_unknown_formats_in_directories(tmp_path):
    _write(f"{tmp_path}/a/x.txt", b"x")
    _write(f"{tmp_path}/a/sub/y.jsonl.gz", b"x")
    _write(f"{tmp_path}/a/README.md", b"x")
    files, skipped = expand_inputs([f"{tmp_path}/a", f"{tmp_path}/a/*.txt"])
    assert [os.path.relpath(f, tmp_path) for f in files] == ["a/sub/y.jsonl.gz", "a/x.txt"]
    assert [os.path.relpath(f, tmp_path) for f in skipped] == ["a/README.md"]
    # Named directly, a file is read whatever its extension (as plain text).
    files, skipped = expand_inputs([f"{tmp_path}/a", f"{tmp_path}/a/README.md"])
    assert len(files) == 3 and skipped == []
    with pytest.raises(FileNotFoundError, match="missing"):
        expand_inputs([f"{tmp_path}/missing"])


# --- quality rules ------------------------------------------------------------------------

def test_each_rule_fires_on_its_own_defect():
    cfg = FilterConfig()
    good = PROSE * 3
    assert first_failing_rule(good, cfg) is None
    line = "Several of the students have finished reading that wonderful novel with us.\n"
    cases = {
        "min_words": "the cat and the dog",
        "max_words": good * 2000,
        "mean_word_length": "the " + "a b c d e f g h i j " * 20,
        "alpha_words": good + " 1234 5678 ==== 9012 ++++ 3456 7890 ----" * 30,
        "symbol_ratio": good + " #tag" * 20,
        "bullet_lines": "\n".join(f"- {line.strip()} {i}" for i in range(20)),
        "ellipsis_lines": "\n".join(f"{line.strip()} {i} ..." for i in range(20)),
        "duplicate_lines": "\n".join([line.strip()] * 10 + [PROSE]),
        "duplicate_line_chars": "\n".join([PROSE, PROSE, PROSE] + [f"{line.strip()} {i}" for i in range(10)]),
        "stop_words": " ".join(["apple banana cherry melon grape lemon"] * 20),
        "language": GERMAN,
    }
    assert set(cases) == set(RULES)
    # the language rule is off until languages are named; German prose also lacks the
    # English stop words, a rule checked before it
    special = {"language": dict(languages=["en"], disabled=["stop_words"])}
    for rule, text in cases.items():
        kw = special.get(rule, {})
        assert first_failing_rule(text, FilterConfig(**kw)) == rule, rule
        off = FilterConfig(**{**kw, "disabled": [*kw.get("disabled", []), rule]})
        assert first_failing_rule(text, off) != rule


def test_language_rule_keeps_the_named_languages():
    english = PROSE * 3
    en = FilterConfig(languages=["en"], disabled=["stop_words"])
    assert first_failing_rule(english, en) is None
    assert first_failing_rule(GERMAN, en) == "language"
    assert first_failing_rule(GERMAN, FilterConfig(languages=["en", "de"], disabled=["stop_words"])) is None
    assert first_failing_rule(GERMAN, FilterConfig(disabled=["stop_words"])) is None  # off by default
    assert language_confidence(GERMAN, ["de"]) > 0.9 > 0.1 > language_confidence(GERMAN, ["en"])
    # a mixed document: judged on its first 2,000 characters
    assert first_failing_rule(english * 3 + GERMAN * 10, en) is None
    assert first_failing_rule(GERMAN * 3 + english * 10, en) == "language"
    # the threshold applies to the named languages' confidence together
    mixed = english[:900] + GERMAN[:1100]
    c = language_confidence(mixed, ["en"])
    assert 0.0 < c < 1.0 and language_confidence(mixed, ["en", "de"]) > c
    assert first_failing_rule(mixed, FilterConfig(languages=["en"], min_language_confidence=min(c + 1e-6, 1.0),
                                                  disabled=["stop_words"])) == "language"
    assert first_failing_rule(mixed, FilterConfig(languages=["en"], min_language_confidence=c / 2,
                                                  disabled=["stop_words"])) is None
    with pytest.raises(ConfigError, match=r"filters.languages.*\['english', 'EN', 'xx'\]"):
        load_config(ExtractConfig, None, ['filters.languages=["en", "english", "EN", "xx"]'])
    with pytest.raises(ConfigError, match="min_language_confidence"):
        load_config(ExtractConfig, None, ["filters.min_language_confidence=1.5"])


def test_rule_thresholds_are_configurable():
    text = words(30)
    assert first_failing_rule(text, FilterConfig()) == "min_words"
    assert first_failing_rule(text, FilterConfig(min_words=20)) is None
    assert first_failing_rule(text, FilterConfig(min_words=20, max_words=25)) == "max_words"


def test_config_validation_names_key_and_value():
    cfg = load_config(ExtractConfig, None,
                      ["filters.min_words=20", "dedup.threshold=0.7", "filters.disabled=stop_words"])
    assert cfg.filters.min_words == 20 and cfg.dedup.threshold == 0.7 and cfg.filters.disabled == ["stop_words"]
    with pytest.raises(ConfigError, match="filters.disabled.*nonsense"):
        load_config(ExtractConfig, None, ["filters.disabled=nonsense"])
    with pytest.raises(ConfigError, match="dedup.num_perm \\(100\\).*dedup.bands \\(16\\)"):
        load_config(ExtractConfig, None, ["dedup.num_perm=100"])
    with pytest.raises(ConfigError, match="validation_fraction.*1.5"):
        load_config(ExtractConfig, None, ["validation_fraction=1.5"])
    with pytest.raises(ConfigError, match="unknown key 'dedup.treshold'"):
        load_config(ExtractConfig, None, ["dedup.treshold=0.5"])


def test_the_one_worker_grouping_is_not_selectable():
    """Near-duplicate groups are always found inside Beam: ``single`` is refused with the
    reason, the former default ``auto`` still loads (saved configs hold it)."""
    assert ExtractConfig().dedup.components == "distributed"
    assert load_config(ExtractConfig, None, ["dedup.components=auto"]).dedup.components == "auto"
    with pytest.raises(ConfigError, match="dedup.components: 'single'.*no longer part of the step"):
        load_config(ExtractConfig, None, ["dedup.components=single"])
    with pytest.raises(ConfigError, match="components.*'union-find'"):
        load_config(ExtractConfig, None, ["dedup.components=union-find"])


# --- MinHash / LSH / clustering -------------------------------------------------------------

def _set_text(ids) -> str:
    # Distinct single-word tokens with ngram=1 make the shingle set exactly ``ids``.
    return " ".join(f"w{i}" for i in ids)


def test_minhash_estimates_jaccard():
    h = MinHasher(num_perm=256, ngram=1, seed=3)
    for overlap, total in ((900, 1000), (500, 1000), (100, 1000)):
        a = _set_text(range(total))
        b = _set_text(range(total - overlap, 2 * total - overlap))
        true_j = overlap / (2 * total - overlap)
        # Binomial standard error with 256 permutations is <= 0.032; allow 4 sigma.
        assert abs(jaccard_estimate(h.signature(a), h.signature(b)) - true_j) < 0.13


def test_minhash_is_deterministic_and_seeded():
    text = words(300, seed=1)
    s1 = MinHasher(seed=1).signature(text)
    assert s1.dtype == np.uint32 and s1.shape == (128,)
    assert np.array_equal(s1, MinHasher(seed=1).signature(text))
    assert not np.array_equal(s1, MinHasher(seed=2).signature(text))
    assert np.array_equal(s1, MinHasher(seed=1).signature(text.upper().replace(" ", "  ")))
    # Fewer words than the n-gram size: the whole text is one shingle.
    assert jaccard_estimate(MinHasher().signature("a b"), MinHasher().signature("a b")) == 1.0
    assert (MinHasher().signature("") == np.iinfo(np.uint32).max).all()


def test_bands_candidates_and_components():
    sig = np.arange(128, dtype=np.uint32)
    keys = band_keys(sig, 16)
    assert len(keys) == 16 and len(set(keys)) == 16
    other = sig.copy()
    other[:8] += 1  # differs in band 0 only
    assert len(set(keys) & set(band_keys(other, 16))) == 15
    assert list(candidate_pairs(["c", "a", "b", "a"])) == [("a", "b"), ("a", "c"), ("b", "c")]
    assert list(candidate_pairs(["d", "c", "b", "a"], max_all_pairs=3)) == [("a", "b"), ("a", "c"), ("a", "d")]
    comp = components([("b", "c"), ("d", "e"), ("c", "a"), ("x", "y")])
    assert comp == {"a": "a", "b": "a", "c": "a", "d": "d", "e": "d", "x": "x", "y": "x"}
    # Same components whatever the edge order.
    assert components(reversed([("b", "c"), ("d", "e"), ("c", "a"), ("x", "y")])) == comp


# --- split and stats ----------------------------------------------------------------------------

def test_split_is_deterministic_and_near_the_fraction():
    ids = [f"doc{i}" for i in range(20000)]
    val = [i for i in ids if split_of(i, 0.1, seed=7) == "validation"]
    assert abs(len(val) / len(ids) - 0.1) < 0.01
    assert val == [i for i in ids if split_of(i, 0.1, seed=7) == "validation"]
    assert val != [i for i in ids if split_of(i, 0.1, seed=8) == "validation"]
    assert all(split_of(i, 0.0, 1) == "train" for i in ids[:100])
    assert all(split_of(i, 1.0, 1) == "validation" for i in ids[:100])


def test_build_stats_balances():
    counters = st.sum_counters([st.file_read(4, 100, 2), st.failed("binary"), st.dropped("min_words"),
                                st.duplicate("fuzzy"), st.kept("train", 10)])
    stats = st.build_stats(counters, inputs=["x"], files=1, skipped=[])
    assert stats["balanced"] and stats["read"] == 4 and stats["failed"]["binary"] == 1
    assert set(stats["dropped"]) == {*RULES, "quality_classifier"} and stats["splits"]["train"] == {"docs": 1, "bytes": 10, "files": []}
    assert not st.build_stats(st.add(counters, st.kept("train", 1)), inputs=[], files=1, skipped=[])["balanced"]


def test_ids_do_not_depend_on_where_the_data_lies(tmp_path):
    from mtnlg.extract.readers import relative_names

    for root in (tmp_path / "one", tmp_path / "two" / "deeper"):
        (root / "corpus" / "sub").mkdir(parents=True)
        (root / "corpus" / "sub" / "a.txt").write_text("some text here")
    ids = []
    for root in (tmp_path / "one", tmp_path / "two" / "deeper"):
        item = str(root / "corpus")
        files, _ = expand_inputs([item])
        names = relative_names([item], files)
        assert names == {files[0]: "corpus/sub/a.txt"}
        (doc,) = list(read_file(files[0], name=names[files[0]]))
        ids.append(doc.id)
    assert ids[0] == ids[1]
    f = str(tmp_path / "one" / "corpus" / "sub" / "a.txt")
    assert relative_names([f], [f]) == {f: "a.txt"}
    assert relative_names([str(tmp_path / "one" / "corpus" / "*" / "*.txt")], [f]) == {f: "sub/a.txt"}


def test_s3_inputs_are_listed_and_read_in_place(s3):
    """The extract step reads s3:// inputs through mtnlg.storage: globs, directories,
    gzip streams (ranged reads), with the same documents as from a local copy."""
    import json

    from mtnlg import storage

    lines = [json.dumps({"text": f"document number {i} " + "word " * 50}) for i in range(300)]
    storage.write_bytes(f"{s3}/raw/a.jsonl.gz", gzip.compress("\n".join(lines).encode()))
    storage.write_text(f"{s3}/raw/sub/b.txt", "a plain text document " * 20)
    storage.write_text(f"{s3}/raw/README", "not read")
    files, skipped = expand_inputs([f"{s3}/raw"])
    assert files == [f"{s3}/raw/a.jsonl.gz", f"{s3}/raw/sub/b.txt"] and skipped == [f"{s3}/raw/README"]
    assert expand_inputs([f"{s3}/raw/**/*.txt"]) == ([f"{s3}/raw/sub/b.txt"], [])
    docs = list(read_file(f"{s3}/raw/a.jsonl.gz"))
    assert len(docs) == 300 and all(isinstance(d, Document) for d in docs)
    assert docs[299].text.startswith("document number 299")
    with pytest.raises(FileNotFoundError, match="nothing"):
        expand_inputs([f"{s3}/nothing"])


def _writes_during_a_blocked_flush(time_limit_ms: int) -> tuple[int, int]:
    """(bytes written, bytes delivered) through a Beam data-plane output stream made as the
    local engine makes the ones to its workers, when a write comes while a flush is blocked
    (the send queue full)."""
    import threading

    from apache_beam.runners.worker.data_plane import ClosableOutputStream

    delivered, in_flush, written = [], threading.Event(), threading.Event()

    def flush(data):
        delivered.append(len(data))
        in_flush.set()
        written.wait(5)  # the send queue is full: the hand-over blocks

    stream = ClosableOutputStream.create(lambda data: delivered.append(len(data)), flush, time_limit_ms)
    stream.write(b"a" * 1000)
    in_flush.wait(3)  # the timed flush (if any) is running now
    stream.write(b"b" * 2000)
    written.set()
    stream.close()
    return 3000, sum(delivered)


def test_beams_timed_flush_loses_what_is_written_while_it_is_blocked():
    """The cause of the marks the 2-worker local runs used to lose (docs/extract.md): if this
    fails, Beam has fixed its stream and ``without_timed_flush`` can go."""
    written, delivered = _writes_during_a_blocked_flush(1000)
    assert delivered == written - 2000


def test_local_engines_send_their_workers_everything(monkeypatch):
    from apache_beam.runners.portability.fn_api_runner import worker_handlers

    from mtnlg.extract.beam.runner import make_pipeline

    for args in (["--runner=DirectRunner", "--direct_num_workers=2", "--direct_running_mode=multi_processing"],
                 ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"]):
        monkeypatch.setattr(worker_handlers, "DATA_BUFFER_TIME_LIMIT_MS", 1000)
        make_pipeline(args)
        assert worker_handlers.DATA_BUFFER_TIME_LIMIT_MS == 0, args
        written, delivered = _writes_during_a_blocked_flush(worker_handlers.DATA_BUFFER_TIME_LIMIT_MS)
        assert delivered == written, args
    monkeypatch.setattr(worker_handlers, "DATA_BUFFER_TIME_LIMIT_MS", 1000)
    make_pipeline(["--runner=PortableRunner", "--job_endpoint=localhost:8099"])  # a Flink/Spark job server
    assert worker_handlers.DATA_BUFFER_TIME_LIMIT_MS == 1000  # a remote engine is not ours to set
