"""Throughput of the extract step: Beam (DirectRunner, N workers) vs the same logic as a plain loop.

The bundled corpus (data/corpus/python-docs, ~35 MB of HTML/text once decompressed) is
scaled to about ``--mb`` MB by copying its files into a temporary directory (copy ``k`` of
a file sits under ``copyK/``, so its document id differs; later copies are exact duplicates
that deduplication removes). Then, in the same run:

* ``loop``: ``mtnlg.extract.reference.extract_reference`` -- read, clean, filter, exact dedup,
  split and write JSONL, one process;
* ``beam``: ``mtnlg.extract.beam_job.extract`` with the same config on ``--workers`` DirectRunner
  processes (wall time of the whole call: pipeline start-up included);
* ``beam+decontaminate``: the same pipeline with decontamination against the validation
  split on (``decontaminate.validation=true``, the default; the two configs differ in
  nothing else);
* ``beam+fuzzy`` (unless ``--no-fuzzy-run``): the pipeline with every default of ``mtnlg
  extract``: MinHash LSH deduplication and decontamination on.

Throughput is decompressed input bytes per second of wall time; with ``--repeat R`` the
three are run alternately R times and the best time of each is kept (the machine may be
shared). The loop and ``beam`` must agree on every count, and ``beam+decontaminate`` must
balance; the script fails otherwise.

    .venv/bin/python benchmarks/extract.py            # ~50 MB, 2 workers
    .venv/bin/python benchmarks/extract.py --mb 10 --workers 1
    .venv/bin/python benchmarks/extract.py --neardup --sizes 100,500   # fuzzy dedup scaling

``--neardup`` measures fuzzy deduplication on the near-duplicate corpus
(``mtnlg.extract.neardup``, scaled by copies that are not near-duplicates of each other)
at each size: MB/s at 1 and ``--workers`` workers, the plain loop (exact dedup only) on the
same input, the peak resident memory of the worker processes and of the driver,
recall/precision against the known groups, and from ``stats.json`` the edges found and
the ids in the largest LSH bucket and near-duplicate group (the most any fuzzy step holds).
Quality filters are off there, so that every
document not kept was dropped as a duplicate.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "corpus" / "python-docs"


def scaled_corpus(dest: Path, target_mb: float) -> int:
    """Copies corpus files under ``dest/copyK/`` until their decompressed size reaches ``target_mb``."""
    from mtnlg.extract.readers import detect_format

    files = sorted(p for p in CORPUS.rglob("*") if p.is_file() and detect_format(str(p)))
    sizes = {}
    for p in files:
        with gzip.open(p, "rb") as f:
            sizes[p] = len(f.read())
    total, k = 0, 0
    while total < target_mb * 1e6:
        for p in files:
            out = dest / f"copy{k}" / p.relative_to(CORPUS)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, out)
            total += sizes[p]
            if total >= target_mb * 1e6:
                break
        k += 1
    return total


def neardup_corpus(dest: Path, target_mb: float):
    """The near-duplicate corpus (``mtnlg.extract.neardup``) scaled to ``target_mb``: copy K
    holds the bundled "What's New" originals with 30% of their words replaced (seeded by K,
    so copies are not near-duplicates of each other: the groups, and the edges, grow in
    number with the input, not in size), and variants of half of them. Returns (MB, truths)."""
    import random

    from mtnlg.extract.neardup import make_corpus, originals_from, replace_words

    sys.path.insert(0, str(REPO / "tests"))
    from corpus_data import whatsnew_paragraphs

    base = originals_from(whatsnew_paragraphs())
    total, truths, k = 0, [], 0
    while total < target_mb * 1e6:
        rng = random.Random(k)
        originals = base if k == 0 else [replace_words(t, 0.3, rng) for t in base]
        truth = make_corpus(originals, str(dest / f"copy{k:03d}"), seed=k, name=f"{dest.name}/copy{k:03d}")
        os.remove(dest / f"copy{k:03d}" / "truth.json")
        truths.append(truth)
        total += sum(f.stat().st_size for f in (dest / f"copy{k:03d}").glob("*.jsonl"))
        k += 1
    return total, truths


def peak_rss_run(cmd: list[str]) -> tuple[float, dict | None, str]:
    """Runs ``cmd`` (this script in --one mode): (seconds, its JSON result or None when it
    failed, the tail of its stderr)."""
    import subprocess

    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    secs = time.perf_counter() - t
    if r.returncode != 0:
        return secs, None, f"exit {r.returncode}: " + r.stderr.strip()[-1500:]
    one = json.loads(r.stdout.strip().splitlines()[-1])
    # extract() reruns on 1 worker when the multi-process counts disagree: that time is not N workers'
    one["reran_on_1_worker"] = "rerunning on 1 worker" in r.stderr
    return secs, one, ""


def run_one(args) -> int:
    """One Beam extract in this process; prints the stats' counts and the peak resident set
    of this process and of its worker processes (RUSAGE_CHILDREN: the largest one)."""
    import resource

    from mtnlg.config import replace
    from mtnlg.extract.beam_job import extract
    from mtnlg.extract.config import RULES, ExtractConfig

    cfg = replace(ExtractConfig(), [f"filters.disabled={json.dumps(list(RULES))}", "decontaminate.validation=false"])
    t = time.perf_counter()
    stats = extract([args.one], args.out, cfg, workers=args.workers)
    seconds = time.perf_counter() - t
    print(json.dumps({"seconds": seconds, "duplicates": stats["duplicates"], "fuzzy": stats["fuzzy"],
                      "read": stats["read"], "kept": stats["kept"],
                      "driver_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "worker_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
    return 0


def main_neardup(args) -> int:
    """Fuzzy deduplication on the near-duplicate corpus at each size of ``--sizes``: MB/s at
    1 and ``--workers`` workers (parallel efficiency), next to the plain loop (exact dedup) on
    the same input in the same run, peak memory per worker, recall and precision."""
    from mtnlg.config import replace
    from mtnlg.extract.config import RULES, ExtractConfig
    from mtnlg.extract.neardup import NearDupCorpus, kept_ids, score
    from mtnlg.extract.reference import extract_reference

    loop_cfg = replace(ExtractConfig(), ["dedup.fuzzy=false", f"filters.disabled={json.dumps(list(RULES))}",
                                         "decontaminate.validation=false"])
    results: dict = {"sizes": {}, "cpus": os.cpu_count()}
    for size in [float(x) for x in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory(prefix="mtnlg-bench-neardup-") as tmp:
            tmp = Path(tmp)
            total, truths = neardup_corpus(tmp / "in", size)
            mb = total / 1e6
            t = time.perf_counter()
            extract_reference([str(tmp / "in")], str(tmp / "out-loop"), loop_cfg)
            loop_s = time.perf_counter() - t
            row = {"input_mb": mb, "loop_mb_per_s": mb / loop_s}
            for workers in sorted({1, args.workers}):
                out = tmp / f"out-{workers}"
                secs, one, err = peak_rss_run([sys.executable, __file__, "--one", str(tmp / "in"), "--out", str(out),
                                               "--workers", str(workers)])
                if one is None:
                    row[f"beam_{workers}"] = {"failed": err, "seconds": secs}
                    print(f"{mb:7.1f} MB, {workers} worker(s): FAILED after {secs:.0f} s: {err}", flush=True)
                    continue
                docs: dict = {}
                should: set = set()
                for tr in truths:  # ids are per file name, which includes the copy
                    docs.update(tr.docs)
                    should |= tr.should_drop
                q = score(NearDupCorpus(str(tmp / "in"), 0.8, docs, should),
                          kept_ids([str(out / "train"), str(out / "validation")]))
                row[f"beam_{workers}"] = {"mb_per_s": mb / secs, "ratio_to_loop": loop_s / secs, **one,
                                          "recall": q["recall"], "precision": q["precision"]}
                r = row[f"beam_{workers}"]
                if r["reran_on_1_worker"]:
                    print(f"{mb:7.1f} MB, {workers} worker(s): the counts disagreed, and the step reran on 1 "
                          f"worker; the time below includes both runs", flush=True)
                f = r["fuzzy"]
                print(f"{mb:7.1f} MB, {workers} worker(s): {r['mb_per_s']:.2f} MB/s ({r['ratio_to_loop']:.2f}x the "
                      f"loop's {row['loop_mb_per_s']:.2f} MB/s), worker peak {r['worker_peak_mb']:.0f} MB, driver "
                      f"peak {r['driver_peak_mb']:.0f} MB, recall {r['recall']:.3f}, precision {r['precision']:.3f}; "
                      f"{f['pairs_similar']} edges, largest bucket {f['largest_bucket']} ids, largest group "
                      f"{f['largest_group']}", flush=True)
            if args.workers > 1 and all("mb_per_s" in row[f"beam_{w}"] and not row[f"beam_{w}"]["reran_on_1_worker"]
                                        for w in (1, args.workers)):
                row["parallel_efficiency"] = (row[f"beam_{args.workers}"]["mb_per_s"]
                                              / row["beam_1"]["mb_per_s"] / args.workers)
            results["sizes"][f"{size:g}"] = row
            if "parallel_efficiency" in row:
                print(f"{mb:7.1f} MB: parallel efficiency {row['parallel_efficiency']:.2f}", flush=True)
    results["loadavg_1m_end"] = os.getloadavg()[0]
    print(f"({os.cpu_count()} CPUs, 1-min load average {os.getloadavg()[0]:.1f} at the end)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def decontamination_alone(extracted: Path, cfg) -> dict:
    """The cost of decontamination itself, in this process: the validation split's n-gram
    set built, and every training document of ``extracted`` checked against it (best of 3)."""
    from mtnlg.extract.decontaminate import NgramSet, decontaminate_document, evaluation_ngrams

    def texts(split: str) -> list[tuple[str, str]]:
        return [(r["id"], r["text"]) for f in sorted((extracted / split).glob("*.jsonl"))
                for r in map(json.loads, f.read_text().splitlines())]

    train, validation = texts("train"), texts("validation")
    d = cfg.decontaminate
    best_build = best_cut = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        ngrams = NgramSet.union(evaluation_ngrams(text, d.ngram, d.min_ngram) for _, text in validation)
        best_build = min(best_build, time.perf_counter() - t)
        t = time.perf_counter()
        for doc_id, text in train:
            decontaminate_document(doc_id, text, ngrams, d)
        best_cut = min(best_cut, time.perf_counter() - t)
    mb = sum(len(text.encode("utf-8")) for _, text in train) / 1e6
    return {"train_mb": mb, "train_docs": len(train), "ngrams": len(ngrams), "build_seconds": best_build,
            "cut_seconds": best_cut, "mb_per_s": mb / best_cut}


def counts(stats: dict) -> dict:
    keys = ("read", "kept", "dropped", "duplicates", "failed", "bytes_in", "bytes_out", "splits")
    out = {k: stats[k] for k in keys}
    out["splits"] = {s: {"docs": v["docs"], "bytes": v["bytes"]} for s, v in stats["splits"].items()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=50.0, help="decompressed input size to scale the corpus to")
    ap.add_argument("--workers", type=int, default=2, help="DirectRunner worker processes")
    ap.add_argument("--repeat", type=int, default=2, help="alternate runs of each; the best time counts")
    ap.add_argument("--no-fuzzy-run", action="store_true", help="skip the extra run with fuzzy dedup on")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    ap.add_argument("--neardup", action="store_true",
                    help="fuzzy deduplication on the near-duplicate corpus at each of --sizes")
    ap.add_argument("--sizes", default="100,500", help="with --neardup: input sizes in MB")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one measured run of this input
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        return run_one(args)

    os.environ.setdefault("MTNLG_LOG_LEVEL", "WARNING")
    if args.neardup:
        return main_neardup(args)
    from mtnlg.config import replace
    from mtnlg.extract.beam_job import extract
    from mtnlg.extract.config import ExtractConfig
    from mtnlg.extract.reference import extract_reference

    # The baseline: cleaning + filtering + exact dedup in one plain Python loop.
    cfg = replace(ExtractConfig(), ["dedup.fuzzy=false", "decontaminate.validation=false"])
    decontaminate_cfg = replace(cfg, ["decontaminate.validation=true"])
    # ... and with the quality classifier on as well: trained in the job on the bundled FAQ
    # pages (the curated reference) against 100 sampled input documents
    reference = Path(__file__).resolve().parent.parent / "data" / "corpus" / "python-docs" / "faq"
    quality_cfg = replace(decontaminate_cfg, [f'quality.reference=["{reference}"]', "quality.negatives=100"])
    results = {}
    with tempfile.TemporaryDirectory(prefix="mtnlg-bench-extract-") as tmp:
        tmp = Path(tmp)
        mb = scaled_corpus(tmp / "in", args.mb) / 1e6
        n_files = sum(1 for _ in (tmp / "in").rglob("*.gz"))
        print(f"input: {n_files} files, {mb:.1f} MB decompressed, in {tmp / 'in'}")

        loop_times, beam_times, dec_times, quality_times = [], [], [], []
        for _ in range(max(args.repeat, 1)):
            t = time.perf_counter()
            _, loop_stats = extract_reference([str(tmp / "in")], str(tmp / "out-loop"), cfg)
            loop_times.append(time.perf_counter() - t)
            t = time.perf_counter()
            beam_stats = extract([str(tmp / "in")], str(tmp / "out-beam"), cfg, workers=args.workers)
            beam_times.append(time.perf_counter() - t)
            t = time.perf_counter()
            dec_stats = extract([str(tmp / "in")], str(tmp / "out-dec"), decontaminate_cfg, workers=args.workers)
            dec_times.append(time.perf_counter() - t)
            t = time.perf_counter()
            quality_stats = extract([str(tmp / "in")], str(tmp / "out-quality"), quality_cfg, workers=args.workers)
            quality_times.append(time.perf_counter() - t)
        loop_s, beam_s, dec_s, quality_s = min(loop_times), min(beam_times), min(dec_times), min(quality_times)
        results["beam+quality+decontaminate"] = {
            "seconds": quality_s, "mb_per_s": mb / quality_s, "workers": args.workers, "all_seconds": quality_times,
            "dropped_quality_classifier": quality_stats["dropped"]["quality_classifier"],
            "kept": quality_stats["kept"], "balanced": quality_stats["balanced"]}
        results["loop"] = {"seconds": loop_s, "mb_per_s": mb / loop_s, "all_seconds": loop_times}
        results["beam"] = {"seconds": beam_s, "mb_per_s": mb / beam_s, "workers": args.workers,
                           "all_seconds": beam_times}
        results["beam+decontaminate"] = {"seconds": dec_s, "mb_per_s": mb / dec_s, "workers": args.workers,
                                         "all_seconds": dec_times, "decontaminated": dec_stats["decontaminated"],
                                         "validation_docs": dec_stats["splits"]["validation"]["docs"]}
        if not dec_stats["balanced"]:
            print("the decontaminated run's counts do not balance", file=sys.stderr)
            return 1
        results["decontaminate_alone"] = decontamination_alone(tmp / "out-loop", decontaminate_cfg)

        if counts(loop_stats) != counts(beam_stats):
            print("MISMATCH between loop and Beam counts:", file=sys.stderr)
            print(json.dumps({"loop": counts(loop_stats), "beam": counts(beam_stats)}, indent=1), file=sys.stderr)
            return 1

        if not args.no_fuzzy_run:
            t = time.perf_counter()
            fuzzy_stats = extract([str(tmp / "in")], str(tmp / "out-fuzzy"), ExtractConfig(), workers=args.workers)
            fuzzy_s = time.perf_counter() - t
            results["beam+fuzzy"] = {"seconds": fuzzy_s, "mb_per_s": mb / fuzzy_s, "workers": args.workers,
                                     "duplicates": fuzzy_stats["duplicates"]}

    ratio = results["beam"]["mb_per_s"] / results["loop"]["mb_per_s"]
    dec_ratio = results["beam+decontaminate"]["mb_per_s"] / results["beam"]["mb_per_s"]
    results["ratio_decontaminate_on_to_off"] = dec_ratio
    results.update({"input_mb": mb, "files": n_files, "ratio_beam_to_loop": ratio, "loadavg_1m_end": os.getloadavg()[0],
                    "read": loop_stats["read"], "kept": loop_stats["kept"],
                    "duplicates_exact": loop_stats["duplicates"]["exact"], "cpus": os.cpu_count()})
    runs = lambda ts: ", ".join(f"{t:.1f}" for t in ts)  # noqa: E731
    print(f"plain loop (1 process)        : {results['loop']['mb_per_s']:6.2f} MB/s  (best of {runs(loop_times)} s)")
    print(f"beam, {args.workers} worker(s)             : {results['beam']['mb_per_s']:6.2f} MB/s  "
          f"(best of {runs(beam_times)} s)")
    r = results["beam+decontaminate"]
    print(f"beam, {args.workers} worker(s), +decontam.: {r['mb_per_s']:6.2f} MB/s  (best of {runs(dec_times)} s; "
          f"{dec_ratio:.2f}x without; {r['validation_docs']} validation documents, "
          f"{r['decontaminated']['ngrams']} n-grams; {r['decontaminated']['documents']} training documents cut, "
          f"{r['decontaminated']['matches']} matches, {r['decontaminated']['bytes_removed']} bytes removed)")
    r = results["beam+quality+decontaminate"]
    quality_ratio = r["mb_per_s"] / results["beam"]["mb_per_s"]
    results["ratio_quality_and_decontaminate_on_to_off"] = quality_ratio
    print(f"beam, {args.workers} worker(s), +quality +decontam.: {r['mb_per_s']:6.2f} MB/s  (best of "
          f"{runs(quality_times)} s; {quality_ratio:.2f}x without both, {r['mb_per_s'] / results['loop']['mb_per_s']:.2f}x "
          f"the plain loop; the classifier dropped {r['dropped_quality_classifier']}, kept {r['kept']})")
    a = results["decontaminate_alone"]
    print(f"decontamination alone         : {a['mb_per_s']:6.2f} MB/s of clean training text, one process "
          f"({a['train_docs']} documents, {a['train_mb']:.1f} MB in {a['cut_seconds']:.2f} s; the set of "
          f"{a['ngrams']} n-grams built in {a['build_seconds']:.3f} s)")
    if "beam+fuzzy" in results:
        r = results["beam+fuzzy"]
        print(f"beam, {args.workers} worker(s), defaults   : {r['mb_per_s']:6.2f} MB/s  ({r['seconds']:.1f} s; "
              f"+fuzzy dedup, +decontamination)")
    print(f"ratio beam / loop             : {ratio:.2f}x  (aim >= 0.7x; {os.cpu_count()} CPUs, "
          f"1-min load average {os.getloadavg()[0]:.1f} at the end)")
    print(f"documents: read {loop_stats['read']}, kept {loop_stats['kept']}, "
          f"exact duplicates {loop_stats['duplicates']['exact']} (identical in both runs)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
