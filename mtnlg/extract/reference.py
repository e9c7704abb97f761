"""The extract step as one plain Python loop: the reference the Beam pipeline is checked against.

Same readers, cleaning, rules, quality classifier, hashes, MinHash, clustering, split and
decontamination as the pipeline, in one process and in file order. Tests compare the
pipeline's output and stats with this; the benchmark times it next to the pipeline. It holds every document in memory,
so it is meant for test- and benchmark-sized inputs, not for production runs.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Any

from mtnlg import storage
from mtnlg.extract import stats as st
from mtnlg.extract.clean import clean_text
from mtnlg.extract.config import ExtractConfig
from mtnlg.extract.decontaminate import (NgramSet, decontaminate_document, evaluation_ngrams, expand_task_files,
                                         frequent_ngrams, ngram_hits, task_texts)
from mtnlg.extract.dedup import MinHasher, band_keys, candidate_pairs, components, jaccard_estimate, text_hash
from mtnlg.extract.filters import first_failing_rule
from mtnlg.extract.quality import RULE as QUALITY_RULE
from mtnlg.extract.quality import NegativeSample, classifier_for, keep, sample_warning
from mtnlg.extract.readers import Failure, expand_inputs, read_file, relative_names
from mtnlg.extract.split import SPLITS, TRAIN, VALIDATION, split_of
from mtnlg.formats.rundir import STATS_FILE
from mtnlg.progress import get_logger

log = get_logger("mtnlg.extract")
SCORE_BATCH = 256  # documents vectorized at once by the quality classifier


def extract_reference(inputs: list[str], output: str | None = None,
                      config: ExtractConfig | None = None) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """``({split: [{"id", "text", "source"[, "quality_score"]}, ...] sorted by id}, stats)``;
    writes them if ``output``. With the quality classifier on, a trained one is saved too
    (``quality.save``, or ``output/quality_classifier.json``)."""
    cfg = config or ExtractConfig()
    files, skipped = expand_inputs(inputs)
    names = relative_names(inputs, files)
    counters: dict[str, int] = {}
    examples: dict[str, list[str]] = defaultdict(list)
    docs: dict[str, tuple[str, str]] = {}  # id -> (source, cleaned text)
    duplicates: dict[str, str] = {}  # id -> "exact" | "fuzzy"
    q = cfg.quality
    # The negatives: a seeded sample of every document read (cleaned, before the rules).
    sample = NegativeSample(q.negatives, q.seed) if q.reference else None

    for path in files:
        records = nbytes = replaced = 0
        for rec in read_file(path, cfg.text_field, cfg.max_doc_bytes, cfg.max_binary_fraction, names[path]):
            records += 1
            nbytes += rec.nbytes
            if isinstance(rec, Failure):
                st.add(counters, st.failed(rec.reason))
                examples[rec.reason].append(f"{rec.source}: {rec.detail}")
                continue
            replaced += rec.replaced
            text = clean_text(rec.text)
            if sample is not None:
                sample.add(rec.id, text)
            rule = first_failing_rule(text, cfg.filters)
            if rule:
                st.add(counters, st.dropped(rule))
                continue
            docs[rec.id] = (rec.source, text)
        st.add(counters, st.file_read(records, nbytes, replaced))

    scores: dict[str, float] = {}  # id -> quality score, of the documents kept by the classifier
    if q.enabled:
        negatives = sample.texts() if sample is not None else []
        warning = sample_warning(len(negatives), sample.seen) if sample is not None else None
        if warning:
            log.warning(warning)
        model = classifier_for(q, negatives, output=output,
                               max_doc_bytes=cfg.max_doc_bytes, max_binary_fraction=cfg.max_binary_fraction)
        ids = sorted(docs)
        for start in range(0, len(ids), SCORE_BATCH):
            batch = ids[start:start + SCORE_BATCH]
            for i, score in zip(batch, model.scores([docs[i][1] for i in batch])):
                if keep(i, score, q.alpha):
                    scores[i] = score
                else:
                    st.add(counters, st.dropped(QUALITY_RULE))
                    del docs[i]

    if cfg.dedup.exact:
        # Of equal texts the smallest id is kept, as in the pipeline.
        best_by_hash: dict[bytes, str] = {}
        for i in sorted(docs):
            h = text_hash(docs[i][1])
            if h in best_by_hash:
                duplicates[i] = "exact"
            else:
                best_by_hash[h] = i

    if cfg.dedup.fuzzy:
        d = cfg.dedup
        hasher = MinHasher(d.num_perm, d.ngram, d.seed)
        sigs = {i: hasher.signature(docs[i][1]) for i in sorted(docs) if i not in duplicates}
        buckets: dict[bytes, list[str]] = defaultdict(list)
        for i, sig in sigs.items():
            for key in band_keys(sig, d.bands):
                buckets[key].append(i)
        pairs = {p for ids in buckets.values() if len(ids) > 1
                 for p in candidate_pairs(ids, d.max_bucket_all_pairs)}
        for ids in buckets.values():
            n = len(ids)
            if n > 1:
                st.add(counters, {"fuzzy/largest_bucket": n})
            if n > d.max_bucket_all_pairs:
                st.add(counters, {"fuzzy/skipped_comparisons": n * (n - 1) // 2 - (n - 1)})
        edges = [(a, b) for a, b in sorted(pairs) if jaccard_estimate(sigs[a], sigs[b]) >= d.threshold]
        st.add(counters, {"fuzzy/pairs_checked": len(pairs), "fuzzy/pairs_similar": len(edges)})
        roots = components(edges)
        for node, root in roots.items():
            if node != root:
                duplicates[node] = "fuzzy"
        if roots:
            st.add(counters, {"fuzzy/largest_group": max(Counter(roots.values()).values())})

    def record(rid: str, text: str, source: str, i: str) -> dict:
        # The score is written only with the classifier on, so that the files are otherwise unchanged.
        return {"id": rid, "text": text, "source": source} | ({"quality_score": scores[i]} if q.enabled else {})

    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    train: list[str] = []
    for i in sorted(docs):
        if i in duplicates:
            st.add(counters, st.duplicate(duplicates[i]))
        elif split_of(i, cfg.validation_fraction, cfg.seed) == VALIDATION:
            source, text = docs[i]
            out[VALIDATION].append(record(i, text, source, i))
            st.add(counters, st.kept(VALIDATION, len(text.encode("utf-8"))))
        else:
            train.append(i)

    d = cfg.decontaminate
    if d.enabled:
        evaluation = [r["text"] for r in out[VALIDATION]] if d.validation else []
        for path in expand_task_files(d):
            for text in task_texts(path, d, cfg.max_doc_bytes, cfg.max_binary_fraction):
                evaluation.append(text)
                st.add(counters, {"decontaminated/task_texts": 1})
        ngrams = NgramSet.union(evaluation_ngrams(t, d.ngram, d.min_ngram) for t in evaluation)
        st.add(counters, {"decontaminated/ngrams": len(ngrams)})
        if d.frequent_documents:
            documents: Counter = Counter()
            for i in train:
                documents.update((k, int(h)) for k, hs in ngram_hits(docs[i][1], ngrams).items() for h in hs)
            frequent = frequent_ngrams(documents.items(), d.frequent_documents)
            ngrams = ngrams.without(frequent)
            st.add(counters, {"decontaminated/frequent_ngrams": len(frequent)})
    for i in train:
        source, text = docs[i]
        if d.enabled:
            records, counts = decontaminate_document(i, text, ngrams, d)
        else:
            records, counts = [(i, text)], st.kept(TRAIN, len(text.encode("utf-8")))
        out[TRAIN] += [record(rid, t, source, i) for rid, t in records]
        st.add(counters, counts)
    out[TRAIN].sort(key=lambda r: r["id"])

    written = {}
    if output:
        for s in SPLITS:
            path = storage.join(output, s, "part-00000-of-00001.jsonl")
            with storage.atomic_write(path, "w") as f:
                for rec in out[s]:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            written[s] = [path]
    stats = st.build_stats(counters, inputs=list(inputs), files=len(files), skipped=skipped,
                           examples=examples, written=written)
    if output:
        storage.write_text(storage.join(output, STATS_FILE), json.dumps(stats, indent=2) + "\n")
    return out, stats
