"""The evaluation report: ``report.md``, a self-contained ``report.html`` and ``loss.png``.

The training loss curve comes from the run's ``log.jsonl`` (``mtnlg.formats.runlog``). The HTML embeds
the PNG as base64 so the Kubeflow UI (which shows one HTML artifact, without its neighbours) displays it.
"""

from __future__ import annotations

import base64
import html
import json
from typing import Any

from mtnlg import storage
from mtnlg.formats.rundir import LOSS_PLOT
from mtnlg.formats.runlog import plot_loss_curve


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.4e}"
    return str(v)


# Fewer cloze items than this and the accuracy's interval is too wide to conclude anything.
FEW_CLOZE_ITEMS = 100


def _with_ci(metrics: dict[str, Any], key: str) -> str:
    """``value (95% CI lo-hi)`` when the metric has an interval."""
    text = _fmt(metrics[key])
    ci = metrics.get(f"{key}_ci95")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(v, float) and v == v for v in ci):
        text += f" (95% CI {_fmt(ci[0])}-{_fmt(ci[1])})"
    return text


def _rows(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    keys = [("validation loss (nats/token)", "val_loss"), ("validation perplexity", "val_perplexity"),
            ("validation bits per byte", "val_bits_per_byte"),
            ("validation tokens", "val_tokens"), ("last-word accuracy", "cloze_accuracy"),
            ("cloze items", "cloze_items"),
            ("last-word accuracy (lm-evaluation-harness)", "lm_eval_cloze_accuracy"),
            ("parameters", "parameters"),
            ("training steps", "train_steps"), ("final training loss", "train_final_loss")]
    rows = [(label, _with_ci(metrics, k)) for label, k in keys if k in metrics]
    n = metrics.get("cloze_items")
    if isinstance(n, int) and 0 < n < FEW_CLOZE_ITEMS:
        rows = [(a, b + f" (only {n} items: too few to conclude)" if a == "last-word accuracy" else b)
                for a, b in rows]
    return rows


def _decoding(metrics: dict[str, Any]) -> str:
    return str(metrics.get("samples_decoding") or "greedy")


def render_markdown(metrics: dict[str, Any], samples: list[dict[str, str]], png_name: str | None,
                    title: str) -> str:
    out = [f"# {title}", "", "| metric | value |", "|---|---|"]
    out += [f"| {a} | {b} |" for a, b in _rows(metrics)]
    if png_name:
        out += ["", "## Training loss", "", f"![training loss]({png_name})"]
    if samples:
        out += ["", f"## Sample generations ({_decoding(metrics)})", ""]
        for s in samples:
            cont = " ".join(s["completion"].split()) or "(end of document)"
            sep = " " if s["completion"][:1].isspace() or not s["completion"] else ""
            out += [f"- **{s['prompt']}**{sep}{cont}"]
    out += ["", "The full metrics are in `metrics.json`.", ""]
    return "\n".join(out)


def render_html(metrics: dict[str, Any], samples: list[dict[str, str]], png_bytes: bytes | None,
                title: str) -> str:
    e = html.escape
    rows = "\n".join(f"<tr><td>{e(a)}</td><td>{e(b)}</td></tr>" for a, b in _rows(metrics))
    parts = [
        "<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">", f"<title>{e(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:56em;margin:1em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}"
        "ol.samples{padding-left:1.5em}ol.samples li{margin:0 0 .5em;line-height:1.4}"
        ".prompt{font-weight:bold}.completion{color:#1a4e8a}.note{color:#666;font-size:90%}</style>",
        "</head><body>", f"<h1>{e(title)}</h1>",
        f"<table><tr><th>metric</th><th>value</th></tr>\n{rows}\n</table>",
    ]
    if png_bytes:
        b64 = base64.b64encode(png_bytes).decode("ascii")
        parts += ["<h2>Training loss</h2>", f"<img alt=\"training loss\" src=\"data:image/png;base64,{b64}\">"]
    if samples:
        parts.append(f"<h2>Sample generations</h2><p class=\"note\">{e(_decoding(metrics))}; "
                     "the prompt in bold, the model's continuation after it</p><ol class=\"samples\">")
        for s in samples:
            cont = " ".join(s["completion"].split())
            shown = e(cont) if cont else "<i>(end of document)</i>"
            sep = " " if s["completion"][:1].isspace() or not cont else ""  # as the text reads
            parts.append(f"<li><span class=\"prompt\">{e(s['prompt'])}</span>{sep}"
                         f"<span class=\"completion\">{shown}</span></li>")
        parts.append("</ol>")
    parts.append("</body></html>")
    return "\n".join(parts)


def train_log_metrics(records: list[dict[str, Any]], skipped: int) -> dict[str, Any]:
    """What the report shows about training: steps and final loss, with the log's counts."""
    out: dict[str, Any] = {"train_log_records": len(records), "train_log_skipped": skipped}
    if records:
        out["train_steps"] = int(max(r["step"] for r in records))
        out["train_first_loss"] = float(records[0]["loss"])
        out["train_final_loss"] = float(records[-1]["loss"])
    return out


def write_report(output: str, metrics: dict[str, Any], samples: list[dict[str, str]],
                 train_records: list[dict[str, Any]] | None = None,
                 title: str = "mtnlg evaluation") -> dict[str, str]:
    """Write ``metrics.json``, ``report.md``, ``report.html`` (and ``loss.png`` from
    ``train_records``) into ``output`` (local, gs:// or s3://); returns their paths."""
    paths = {"metrics": storage.join(output, "metrics.json"), "markdown": storage.join(output, "report.md"),
             "html": storage.join(output, "report.html")}
    png_bytes = None
    if train_records:
        png = storage.join(output, LOSS_PLOT)
        if plot_loss_curve(train_records, png):
            paths["png"] = png
            png_bytes = storage.read_bytes(png)
    storage.write_text(paths["metrics"], json.dumps({**metrics, "samples": samples}, indent=2, sort_keys=True) + "\n")
    storage.write_text(paths["markdown"], render_markdown(metrics, samples, LOSS_PLOT if png_bytes else None, title))
    storage.write_text(paths["html"], render_html(metrics, samples, png_bytes, title))
    return paths
