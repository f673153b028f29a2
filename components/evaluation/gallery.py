"""A look at the results: a self-contained HTML gallery of every test query's top results, per system.

`top_results` ranks one system exactly as the evaluation does (`reranked_similarities` with the system's reranking,
ties by database index, AP from `per_query_scores`); `write_gallery` takes plain arrays only — per system the top-k
database indices, their scores and every query's AP — so it needs no model. The page is one file: every distinct
image is shrunk to a thumbnail, JPEG-encoded once and inlined as a base64 data URI in a CSS class that every
thumbnail of that image uses, so the file references nothing outside itself and stays small. A model that crops
each image to its object before describing it (components.models.localise) has its boxes drawn on the thumbnails,
so a person can check what was described.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import ImageDraw

from components.data.images import load_rgb
from components.evaluation.metrics import per_query_scores, relevance_from_similarity
from components.search.postprocess import Reranking, reranked_similarities
from components.storage import atomic_write_path

TOP_K = 10
THUMB_SIDE = 96  # a thumbnail's longer side, in pixels
JPEG_QUALITY = 80
BOX_COLOUR = (255, 200, 0)
Box = tuple[int, int, int, int]  # left, top, right, bottom pixels of the original image


@dataclass(frozen=True)
class SystemResults:
    """One system's results on the queries: top (queries x k) database indices, best first; their scores (same
    shape, higher is better); ap (queries,) each query's AP over its full ranking."""

    top: npt.NDArray[np.integer]
    scores: npt.NDArray[np.floating]
    ap: npt.NDArray[np.floating]


def top_results(query_desc: npt.ArrayLike, db_desc: npt.ArrayLike, query_labels: Sequence, db_labels: Sequence,
                reranking: Reranking = Reranking(), k: int = TOP_K) -> SystemResults:
    """The Firearm protocol's ranking of the queries against the database, as `score_test` ranks them: the top `k`
    (ties by database index, as `relevance_from_similarity` breaks them), their similarities and every query's AP."""
    sim = np.asarray(reranked_similarities(query_desc, db_desc, reranking), dtype=np.float64)
    q_labels, d_labels = np.asarray(query_labels), np.asarray(db_labels)
    ap = per_query_scores(*relevance_from_similarity(sim, q_labels, d_labels), cmc_ranks=(1,), recall_ks=())["ap"]
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return SystemResults(top=top, scores=np.take_along_axis(sim, top, axis=1), ap=ap)


def write_gallery(path: Path | str, query_uris: Sequence[str], query_labels: Sequence, db_uris: Sequence[str],
                  db_labels: Sequence, systems: Mapping[str, SystemResults], *, title: str = "Firesight test gallery",
                  generated: datetime | None = None, side: int = THUMB_SIDE,
                  boxes: Mapping[str, Box] | None = None, boxes_of: str = "") -> int:
    """Write the gallery to `path`; return the number of queries shown.

    Every query, worst AP first (the first system's AP, ties by query order), with one row per system (in `systems`'
    order): the query's AP and its top results, each framed green (class "correct": same label as the query) or red
    (class "wrong") with its score and label. The header gives each system's mAP (the mean of its APs) and the date.
    `boxes`: an object box per image uri, outlined on its thumbnail; `boxes_of` names the system whose crops they are.
    """
    q_uris, q_labels = [str(u) for u in query_uris], [str(x) for x in query_labels]
    d_uris, d_labels = [str(u) for u in db_uris], [str(x) for x in db_labels]
    n = _check(q_uris, q_labels, d_uris, d_labels, systems)
    generated = generated or datetime.now(timezone.utc)
    first = next(iter(systems.values()))
    order = np.argsort(np.asarray(first.ap, dtype=np.float64), kind="stable")

    thumbs: dict[str, int] = {}  # uri -> its CSS class number, in first-use order

    def thumb(uri: str, label: str) -> str:
        cls = thumbs.setdefault(uri, len(thumbs))
        tip = html.escape(f"{label} — {uri}")
        return f'<div class="thumb i{cls}" role="img" aria-label="{tip}" title="{tip}"></div>'

    body = []
    for rank, qi in enumerate(order, 1):
        q_label = q_labels[qi]
        rows = []
        for name, s in systems.items():
            ap = float(s.ap[qi])
            cells = []
            for j, score in zip(s.top[qi], s.scores[qi], strict=True):
                label = d_labels[j]
                kind = "correct" if label == q_label else "wrong"
                cells.append(f'<figure class="result {kind}" data-db="{int(j)}">{thumb(d_uris[j], label)}'
                             f'<figcaption><span class="score">{float(score):.3f}</span>'
                             f'<span class="label">{html.escape(label)}</span></figcaption></figure>')
            rows.append(f'<div class="row" data-system="{html.escape(name)}">'
                        f'<div class="system"><b>{html.escape(name)}</b>'
                        f'<span class="ap" data-ap="{ap:.6f}">AP {ap:.3f}</span></div>{"".join(cells)}</div>')
        body.append(f'<section class="query" data-query="{int(qi)}" data-rank="{rank}">'
                    f'<figure class="probe">{thumb(q_uris[qi], q_label)}'
                    f'<figcaption><span class="label">{html.escape(q_label)}</span></figcaption></figure>'
                    f'<div class="rows">{"".join(rows)}</div></section>')

    boxes = boxes or {}
    css = "\n".join(f".i{cls}{{background-image:url(data:image/jpeg;base64,{_thumbnail(uri, side, boxes.get(uri))})}}"
                    for uri, cls in thumbs.items())
    crops = (f'<p class="crops"><span class="box">Yellow boxes</span>: the object crops {html.escape(boxes_of)} '
             f'describes.</p>' if boxes else "")
    summary = "".join(f'<li data-system="{html.escape(name)}"><b>{html.escape(name)}</b>: mAP '
                      f'<span class="map">{float(np.mean(s.ap)):.4f}</span></li>' for name, s in systems.items())
    page = _PAGE.format(
        title=html.escape(title), side=side, css=css, summary=summary, crops=crops, body="\n".join(body),
        date=html.escape(generated.strftime("%Y-%m-%d %H:%M %Z").strip()), queries=n, database=len(d_uris),
        k=first.top.shape[1])
    with atomic_write_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return n


def _check(q_uris: list[str], q_labels: list[str], d_uris: list[str], d_labels: list[str],
           systems: Mapping[str, SystemResults]) -> int:
    n, m = len(q_uris), len(d_uris)
    if len(q_labels) != n or len(d_labels) != m:
        raise ValueError(f"need one label per image: {n} query uris, {len(q_labels)} labels; "
                         f"{m} database uris, {len(d_labels)} labels")
    if not systems:
        raise ValueError("no system to show")
    if n == 0 or m == 0:
        raise ValueError(f"nothing to show: {n} queries, {m} database images")
    for name, s in systems.items():
        top, scores, ap = np.asarray(s.top), np.asarray(s.scores), np.asarray(s.ap)
        if top.ndim != 2 or top.shape[0] != n or scores.shape != top.shape or ap.shape != (n,):
            raise ValueError(f"{name}: need top and scores of shape ({n}, k) and ap of shape ({n},), "
                             f"got {top.shape}, {scores.shape} and {ap.shape}")
        if not np.issubdtype(top.dtype, np.integer) or (top.size and (top.min() < 0 or top.max() >= m)):
            raise ValueError(f"{name}: top must hold integer indices into the {m} database images")
    return n


def _thumbnail(uri: str, side: int, box: Box | None = None) -> str:
    """The image at `uri`, `box` outlined on it (thick enough to survive the shrinking), its longer side shrunk to
    `side`, as base64 JPEG."""
    im = load_rgb(uri)
    if box is not None:
        ImageDraw.Draw(im).rectangle(box, outline=BOX_COLOUR, width=max(2, round(2 * max(im.size) / side)))
    im.thumbnail((side, side))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:1em;color:#222}}
header ul{{list-style:none;padding:0}}
.query{{display:flex;gap:12px;align-items:flex-start;border-top:1px solid #ccc;padding:8px 0}}
.row{{display:flex;gap:4px;align-items:flex-start;margin-bottom:6px}}
.system{{width:150px;display:flex;flex-direction:column;font-size:13px}}
figure{{margin:0;width:{side}px;font-size:11px;text-align:center}}
figcaption span{{display:block;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}}
.thumb{{width:{side}px;height:{side}px;background:#eee no-repeat center/contain;box-sizing:border-box}}
.probe .thumb{{border:4px solid #36c}}
.correct .thumb{{border:4px solid #2a2}}
.wrong .thumb{{border:4px solid #d22}}
.legend .c{{color:#2a2}} .legend .w{{color:#d22}} .crops .box{{color:#b80}}
{css}
</style>
</head>
<body>
<header>
<h1>{title}</h1>
<p>Generated <time>{date}</time>. Firearm protocol: {queries} test queries against the {database} test database
images; the top {k} per system, worst query (first system's AP) first.
<span class="legend"><span class="c">green</span>: same class as the query;
<span class="w">red</span>: another class.</span></p>
<ul class="systems">{summary}</ul>
{crops}
</header>
<main>
{body}
</main>
</body>
</html>
"""
