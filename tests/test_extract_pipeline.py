"""The extract step's DoFns and PTransforms on Beam's TestPipeline, checked with assert_that."""

from __future__ import annotations

import random

import apache_beam as beam
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from mtnlg.extract.beam.common import DROPPED, DUPLICATES, FAILED, FILES
from mtnlg.extract.beam.dedup import Deduplicate, FuzzyDedup
from mtnlg.extract.beam.filter import CleanAndFilter, CleanAndFilterFn
from mtnlg.extract.beam.grouping import ConnectedComponents
from mtnlg.extract.beam.read import ReadDocuments
from mtnlg.extract.beam.runner import beam_options
from mtnlg.config import replace
from mtnlg.extract.clean import clean_text
from mtnlg.extract.config import DedupConfig, ExtractConfig, FilterConfig
from mtnlg.extract.dedup import MinHasher, band_keys, candidate_pairs, components, jaccard_estimate

from corpus_data import COMMON_WORDS as VOCAB
import pytest

pytestmark = pytest.mark.unit



def prose(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def mutate(text: str, changes: int, seed: int) -> str:
    """``text`` with ``changes`` words replaced: a near-duplicate."""
    rng = random.Random(seed)
    words = text.split()
    for i in rng.sample(range(len(words)), changes):
        words[i] = f"changed{rng.randrange(10**6)}"
    return " ".join(words)


def runner():
    # Beam's local engine without the DirectRunner's attempt to download Prism.
    return test_pipeline.TestPipeline(runner="FnApiRunner")


def test_read_documents_outputs(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("hello world, a plain document")
    (tmp_path / "bad.txt.gz").write_bytes(b"not gzip at all")
    lines = tmp_path / "docs.jsonl"
    lines.write_text('{"text": "one"}\nnot json\n{"text": "two"}\n')
    with runner() as p:
        files = [str(good), str(tmp_path / "bad.txt.gz"), str(lines)]
        out = (p | beam.Create([(f, f.rsplit("/", 1)[1]) for f in files])
               | ReadDocuments(ExtractConfig()))
        assert_that(out.docs | "Texts" >> beam.Map(lambda d: d[2]),
                    equal_to(["hello world, a plain document", "one", "two"]), label="docs")
        assert_that(out[FAILED] | "Reasons" >> beam.Map(lambda f: (f[0], f[1].rsplit("/", 1)[1])),
                    equal_to([("corrupt_gzip", "bad.txt.gz"), ("invalid_json", "docs.jsonl:2")]), label="failed")
        assert_that(out[FILES] | "Read" >> beam.Map(lambda c: c["read"]), equal_to([1, 1, 3]), label="files")


def test_clean_and_filter_fn():
    long_doc = prose(80, seed=1)
    docs = [("a", "s", "  Caf\u0065\u0301 \x07" + long_doc), ("b", "s", "too short"),
            ("c", "s", "apple banana " * 40)]
    with runner() as p:
        out = p | beam.Create(docs) | beam.ParDo(CleanAndFilterFn(FilterConfig())).with_outputs(DROPPED, main="docs")
        assert_that(out.docs, equal_to([("a", "s", clean_text("Caf\u00e9 " + long_doc))]), label="kept")
        assert_that(out[DROPPED], equal_to(["min_words", "stop_words"]), label="dropped")
        # the step's composite: the same documents kept, the same reasons
        both = p | "Again" >> beam.Create(docs) | CleanAndFilter(ExtractConfig())
        assert_that(both["docs"] | beam.Map(lambda d: d[0]), equal_to(["a"]), label="composite-kept")
        assert_that(both[DROPPED], equal_to(["min_words", "stop_words"]), label="composite-dropped")


def test_deduplicate_keeps_smallest_id():
    base, other = prose(300, seed=2), prose(300, seed=3)
    docs = [
        ("k1", "s", base),
        ("k0", "s", base.upper()),            # exact duplicate (case-folded), smaller id: kept
        ("k2", "s", mutate(base, 3, seed=4)),  # near-duplicate of k0/k1: fuzzy
        ("k3", "s", other),
    ]
    with runner() as p:
        out = p | beam.Create(docs) | Deduplicate(DedupConfig())
        assert_that(out["unique"] | beam.Map(lambda d: d[0]), equal_to(["k0", "k3"]), label="unique")
        assert_that(out[DUPLICATES], equal_to(["exact", "fuzzy"]), label="duplicates")


def test_deduplicate_exact_only_and_off():
    base = prose(100, seed=5)
    docs = [("b", "s", base), ("a", "s", base + "  "), ("c", "s", mutate(base, 2, seed=6))]
    with runner() as p:
        exact = p | "Exact" >> beam.Create(docs) | "DedupExact" >> Deduplicate(DedupConfig(fuzzy=False))
        assert_that(exact["unique"] | "ExactIds" >> beam.Map(lambda d: d[0]), equal_to(["a", "c"]), label="exact")
        off = p | "Off" >> beam.Create(docs) | "DedupOff" >> Deduplicate(DedupConfig(exact=False, fuzzy=False))
        assert_that(off["unique"] | "OffIds" >> beam.Map(lambda d: d[0]), equal_to(["a", "b", "c"]), label="off")
        assert_that(off[DUPLICATES], equal_to([]), label="no-dups")


def _signatures_and_buckets(texts: dict[str, str], cfg: DedupConfig) -> tuple[dict, dict]:
    """MinHash signatures by id, and the ids in each LSH band bucket, computed in a plain loop."""
    hasher = MinHasher(cfg.num_perm, cfg.ngram, cfg.seed)
    sigs = {i: hasher.signature(t) for i, t in texts.items()}
    buckets: dict = {}
    for i, sig in sigs.items():
        for k in band_keys(sig, cfg.bands):
            buckets.setdefault(k, []).append(i)
    return sigs, buckets


def test_fuzzy_dedup_matches_single_process_reference():
    """Clusters, a chain (a~b, b~c, a!~c) and unrelated texts: same drops as a plain loop."""
    cfg = DedupConfig(threshold=0.8, max_bucket_all_pairs=4)
    texts = {}
    for c in range(6):
        base = prose(200, seed=100 + c)
        texts[f"c{c}-0"] = base
        for j in range(1, 1 + c % 4):
            texts[f"c{c}-{j}"] = mutate(base, 2 + j, seed=10 * c + j)
    chain_a = prose(400, seed=7)
    chain_b = mutate(chain_a, 8, seed=8)
    chain_c = mutate(chain_b, 8, seed=9)
    texts.update({"z-a": chain_a, "z-b": chain_b, "z-c": chain_c})
    for i in range(10):
        texts[f"u{i}"] = prose(150, seed=200 + i)

    sigs, buckets = _signatures_and_buckets(texts, cfg)
    pairs = {p for ids in buckets.values() if len(ids) > 1 for p in candidate_pairs(ids, cfg.max_bucket_all_pairs)}
    edges = [p for p in pairs if jaccard_estimate(sigs[p[0]], sigs[p[1]]) >= cfg.threshold]
    expected = sorted(n for n, root in components(edges).items() if n != root)
    j = lambda a, b: jaccard_estimate(sigs[a], sigs[b])  # noqa: E731
    assert j("z-a", "z-b") >= 0.8 and j("z-b", "z-c") >= 0.8 and j("z-a", "z-c") < 0.8  # a real chain
    assert expected == ["c1-1", "c2-1", "c2-2", "c3-1", "c3-2", "c3-3", "c5-1", "z-b", "z-c"]

    with runner() as p:
        sig_pc = p | beam.Create(sorted((i, s.astype("<u4").tobytes()) for i, s in sigs.items()))
        fuzzy = sig_pc | FuzzyDedup(cfg)
        assert_that(fuzzy["marks"], equal_to([(n, "fuzzy") for n in expected]), label="marks")
        assert_that(fuzzy["counts"] | beam.Filter(lambda c: "fuzzy/unconverged_nodes" in c), equal_to([]),
                    label="converged")


def test_comparisons_a_huge_bucket_skips_are_counted():
    cfg = DedupConfig(max_bucket_all_pairs=4)
    base = prose(300, seed=11)
    texts = {f"n{i}": mutate(base, 1, seed=i) for i in range(10)}  # ten near-copies: shared buckets
    sigs, buckets = _signatures_and_buckets(texts, cfg)
    expected = sum(len(v) * (len(v) - 1) // 2 - (len(v) - 1) for v in buckets.values() if len(v) > 4)
    assert expected > 0
    with runner() as p:
        sig_pc = p | beam.Create(sorted((i, sg.astype("<u4").tobytes()) for i, sg in sigs.items()))
        fuzzy = sig_pc | FuzzyDedup(cfg)
        assert_that(fuzzy["counts"] | beam.Map(lambda c: c.get("fuzzy/skipped_comparisons", 0))
                    | beam.CombineGlobally(sum), equal_to([expected]))


def _graph(seed: int) -> list[tuple[str, str]]:
    """Chains (long ones too), stars, cliques and random edges over ids in random order."""
    rng = random.Random(seed)
    ids = [f"d{i:04d}" for i in range(600)]
    rng.shuffle(ids)  # so that a chain's smallest id sits anywhere along it
    edges, k = [], 0
    for length in (2, 3, 17, 64, 200):  # chains
        chain = ids[k:k + length]
        k += length
        edges += list(zip(chain, chain[1:]))
    hub, leaves = ids[k], ids[k + 1:k + 40]  # a star
    k += 40
    edges += [(hub, leaf) for leaf in leaves]
    clique = ids[k:k + 8]
    k += 8
    edges += [(a, b) for a in clique for b in clique if a < b]
    rest = ids[k:]
    edges += [(rng.choice(rest), rng.choice(rest)) for _ in range(120)]
    return [(a, b) for a, b in edges if a != b]


@pytest.mark.parametrize("seed", [1])
def test_connected_components_in_beam_match_union_find(seed):
    edges = _graph(seed)
    expected = components(edges)
    # the slowest shapes for large-star and small-star: a chain in ascending id order, and a
    # star whose hub is the largest id of its component
    chain = [f"c{i:03d}" for i in range(100)]
    slow = list(zip(chain, chain[1:])) + [("s9", f"s{i}") for i in range(9)]
    with runner() as p:
        cc = p | beam.Create(edges) | ConnectedComponents(rounds=10)
        assert_that(cc["labels"], equal_to(sorted(expected.items())), label="labels")
        assert_that(cc["unconverged"], equal_to([]), label="converged")
        slow_cc = p | "Slow" >> beam.Create(slow) | "SlowCC" >> ConnectedComponents(rounds=10)
        assert_that(slow_cc["labels"], equal_to(sorted(components(slow).items())), label="slow-labels")
        assert_that(slow_cc["unconverged"], equal_to([]), label="slow-converged")


def test_too_few_rounds_are_counted_and_only_ever_keep_too_much():
    chain = [f"n{i:03d}" for i in range(200)]  # ascending: the minimum sits at one end
    edges = list(zip(chain, chain[1:]))
    with runner() as p:
        cc = p | beam.Create(edges) | ConnectedComponents(rounds=2)
        # labels never go below the true minimum, and never leave the component
        assert_that(cc["labels"] | "Wrong" >> beam.Filter(lambda vl: not ("n000" <= vl[1] <= vl[0])), equal_to([]),
                    label="sound")
        assert_that(cc["unconverged"] | beam.combiners.Count.Globally() | beam.Map(lambda n: n > 0),
                    equal_to([True]), label="counted")


def test_a_local_first_attempt_runs_few_rounds_of_the_grouping():
    from mtnlg.extract.beam_job import FIRST_ROUNDS, first_attempt

    cfg = ExtractConfig()
    assert cfg.dedup.max_rounds > FIRST_ROUNDS
    for local in (["--runner=DirectRunner"], ["--runner=PortableRunner", "--job_endpoint=embed"]):
        assert first_attempt(cfg, local).dedup.max_rounds == FIRST_ROUNDS
        assert first_attempt(cfg, local).dedup.threshold == cfg.dedup.threshold
    # a remote runner, a config with few rounds or no fuzzy step: as configured
    assert first_attempt(cfg, ["--runner=DataflowRunner"]) is cfg
    assert first_attempt(cfg, ["--runner=PortableRunner", "--job_endpoint=host:8099"]) is cfg
    for few in (replace(cfg, ["dedup.max_rounds=3"]), replace(cfg, ["dedup.fuzzy=false"])):
        assert first_attempt(few, ["--runner=DirectRunner"]) is few


def test_beam_options_runner_and_workers():
    quiet = ["--default_sdk_harness_log_level=WARNING", '--sdk_harness_log_level_overrides={"__main__": "ERROR", '
             '"apache_beam.runners.worker.sdk_worker_main": "ERROR", "apache_beam.options.pipeline_options": "ERROR"}']
    assert beam_options([], 1) == ["--runner=DirectRunner", *quiet, "--direct_num_workers=1",
                                   "--direct_running_mode=in_memory"]
    assert beam_options([]) == ["--runner=DirectRunner", *quiet]
    assert beam_options(["--temp_location=/t"], 4) == [
        "--temp_location=/t", "--runner=DirectRunner", *quiet,
        "--direct_num_workers=4", "--direct_running_mode=multi_processing"]
    dataflow = ["--runner", "DataflowRunner", "--project=p", "--region=r"]
    assert beam_options(dataflow, 4) == dataflow  # other runners' options pass through unchanged
    assert beam_options(["--direct_num_workers=3", "--default_sdk_harness_log_level=INFO",
                         "--sdk_harness_log_level_overrides={}"], 2) == [
        "--direct_num_workers=3", "--default_sdk_harness_log_level=INFO", "--sdk_harness_log_level_overrides={}",
        "--runner=DirectRunner"]


def test_beams_start_up_notices_are_not_shown():
    """What means nothing to a user of the step: Beam's note that apitools (BigQuery) is
    missing, and its local workers' notes on staged sessions and unknown options."""
    import logging

    import mtnlg.extract.beam_job  # noqa: F401  (installs the filter)

    root = logging.getLogger()
    notice = logging.LogRecord("root", logging.WARNING, "x", 1, "apitools not found, and bigquery client "
                               "libraries are not available despite the import not raising an ImportError.", None, None)
    other = logging.LogRecord("root", logging.WARNING, "x", 1, "a real problem", None, None)
    assert root.filter(notice) is False and root.filter(other)
    from apache_beam.options.pipeline_options import PipelineOptions

    opts = PipelineOptions(beam_options([], 2)).get_all_options()
    assert opts["sdk_harness_log_level_overrides"] == {"__main__": "ERROR",
                                                       "apache_beam.runners.worker.sdk_worker_main": "ERROR",
                                                       "apache_beam.options.pipeline_options": "ERROR"}

