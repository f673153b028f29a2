"""The evaluate stage's HTML gallery (components.evaluation.gallery): one self-contained file, every query worst AP
first, results framed by correctness, labels escaped, each image inlined once; and its ranking is the evaluation's."""

from __future__ import annotations

import base64
import io
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from components.evaluation.gallery import SystemResults, top_results, write_gallery
from components.evaluation.protocol import score_test
from components.search.postprocess import KReciprocal, Reranking
from tests.conftest import SAMPLE

VOID = {"meta", "img", "br", "hr", "link", "input", "source", "area", "base", "col", "embed", "param", "track", "wbr"}
EVIL = '<script>alert("x")</script> & co'


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node] = field(default_factory=list)
    text: str = ""

    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def find_all(self, pred) -> list[Node]:
        found = [self] if pred(self) else []
        for c in self.children:
            found += c.find_all(pred)
        return found

    def with_class(self, cls: str, tag: str | None = None) -> list[Node]:
        return self.find_all(lambda n: cls in n.classes() and (tag is None or n.tag == tag))

    def all_text(self) -> str:
        return self.text + "".join(c.all_text() for c in self.children)


class TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag):
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data):
        self.stack[-1].children.append(Node("#text", {}, text=data))


def parse(text: str) -> Node:
    builder = TreeBuilder()
    builder.feed(text)
    builder.close()
    assert builder.stack == [builder.root], "unclosed elements"
    return builder.root


@pytest.fixture(scope="module")
def images() -> dict[str, list[str]]:
    classes = sorted(d for d in SAMPLE.iterdir() if d.is_dir())[:3]
    return {d.name: [str(f) for f in sorted(d.glob("*.jpg"))[:4]] for d in classes}


@pytest.fixture(scope="module")
def case(images):
    """4 queries (one per class, the third class labelled with markup) against 9 database images, top 4 each."""
    (a, b, c) = images
    label = {a: a, b: b, c: EVIL}
    q_uris = [images[a][0], images[b][0], images[c][0], images[a][1]]
    q_labels = [label[a], label[b], label[c], label[a]]
    d_uris = images[a][2:4] + images[b][1:4] + images[c][1:4] + [images[a][1]]  # the last is also query 3's image
    d_labels = [label[a]] * 2 + [label[b]] * 3 + [label[c]] * 3 + [label[a]]
    full = SystemResults(top=np.array([[0, 1, 2, 3], [2, 3, 0, 4], [5, 0, 6, 7], [8, 5, 6, 7]]),
                         scores=np.array([[.9, .8, .7, .6], [.9, .5, .4, .3], [.8, .7, .6, .1], [.95, .5, .4, .2]]),
                         ap=np.array([1.0, 0.5, 0.25, 0.125]))
    shelf = SystemResults(top=np.array([[2, 3, 0, 1], [0, 1, 2, 3], [5, 6, 7, 0], [5, 6, 7, 0]]),
                          scores=np.array([[.5, .4, .3, .2], [.6, .5, .4, .3], [.7, .6, .5, .4], [.3, .2, .1, 0.]]),
                          ap=np.array([0.3, 0.2, 1.0, 0.05]))
    return q_uris, q_labels, d_uris, d_labels, {"full pipeline": full, "off-the-shelf": shelf}


@pytest.fixture(scope="module")
def gallery(case, tmp_path_factory):
    path = tmp_path_factory.mktemp("gallery") / "reports" / "gallery.html"
    shown = write_gallery(path, *case, generated=datetime(2024, 5, 6, 7, 8, tzinfo=timezone.utc))
    text = path.read_text(encoding="utf-8")
    return shown, text, parse(text)


def test_one_self_contained_file(gallery):
    shown, text, root = gallery
    assert shown == 4
    assert text.startswith("<!DOCTYPE html>")
    refs = [(n.tag, k, v) for n in root.find_all(lambda n: True) for k, v in n.attrs.items() if k in {"src", "href"}]
    assert all(v.startswith("data:") for _, _, v in refs), refs
    assert not root.find_all(lambda n: n.tag in {"script", "link", "iframe"})
    css = "".join(n.all_text() for n in root.find_all(lambda n: n.tag == "style"))
    for url in re.findall(r"url\(([^)]*)\)", css):
        assert url.startswith("data:image/jpeg;base64,"), url[:40]
    assert "2024-05-06" in root.find_all(lambda n: n.tag == "time")[0].all_text()


def test_every_query_worst_ap_first(gallery, case):
    _, _, root = gallery
    sections = root.with_class("query", "section")
    assert [int(s.attrs["data-query"]) for s in sections] == [3, 2, 1, 0]  # the full pipeline's AP, ascending
    for s in sections:
        assert [r.attrs["data-system"] for r in s.with_class("row")] == ["full pipeline", "off-the-shelf"]


def test_ap_and_map_shown(gallery, case):
    _, _, root = gallery
    systems = case[4]
    for s in root.with_class("query", "section"):
        qi = int(s.attrs["data-query"])
        for row in s.with_class("row"):
            (ap,) = row.with_class("ap")
            expected = systems[row.attrs["data-system"]].ap[qi]
            assert float(ap.attrs["data-ap"]) == pytest.approx(expected)
            assert ap.all_text() == f"AP {expected:.3f}"
    for li in root.find_all(lambda n: n.tag == "li" and "data-system" in n.attrs):
        (m,) = li.with_class("map")
        assert float(m.all_text()) == pytest.approx(np.mean(systems[li.attrs["data-system"]].ap), abs=1e-4)


def test_results_framed_by_correctness(gallery, case):
    _, _, root = gallery
    _, q_labels, _, d_labels, systems = case
    for s in root.with_class("query", "section"):
        qi = int(s.attrs["data-query"])
        for row in s.with_class("row"):
            sys = systems[row.attrs["data-system"]]
            figures = row.with_class("result", "figure")
            assert [int(f.attrs["data-db"]) for f in figures] == sys.top[qi].tolist()
            truth = [d_labels[j] == q_labels[qi] for j in sys.top[qi]]
            assert [("correct" in f.classes(), "wrong" in f.classes()) for f in figures] == [(t, not t) for t in truth]
            assert [f.with_class("label")[0].all_text() for f in figures] == [d_labels[j] for j in sys.top[qi]]
            assert [f.with_class("score")[0].all_text() for f in figures] == [f"{x:.3f}" for x in sys.scores[qi]]
    total = sum(len(r.top[i]) for r in systems.values() for i in range(4))
    correct = sum(d_labels[j] == q_labels[i] for r in systems.values() for i in range(4) for j in r.top[i])
    assert len(root.with_class("correct", "figure")) == correct
    assert len(root.with_class("wrong", "figure")) == total - correct
    assert 0 < correct < total


def test_labels_escaped(gallery):
    _, text, root = gallery
    assert "<script>" not in text
    assert not root.find_all(lambda n: n.tag == "script")
    shown = [n.all_text() for n in root.with_class("label")]
    assert EVIL in shown  # parsed back to the label itself
    assert any(EVIL in n.attrs.get("title", "") for n in root.with_class("thumb"))


def test_each_image_embedded_once(gallery, case):
    _, text, root = gallery
    q_uris, _, d_uris, _, systems = case
    css = "".join(n.all_text() for n in root.find_all(lambda n: n.tag == "style"))
    defined = dict(re.findall(r"\.(i\d+)\{background-image:url\(data:image/jpeg;base64,([A-Za-z0-9+/=]+)\)\}", css))
    used = {q_uris[i] for i in range(4)} | {d_uris[j] for r in systems.values() for row in r.top for j in row}
    assert len(defined) == len(used) == len(set(defined.values()))
    assert text.count("data:image/jpeg;base64,") == len(used)
    uri_of_class: dict[str, str] = {}
    for thumb in root.with_class("thumb"):
        (cls,) = [c for c in thumb.classes() if re.fullmatch(r"i\d+", c)]
        assert cls in defined
        uri = thumb.attrs["title"].rsplit(" — ", 1)[1]
        assert uri_of_class.setdefault(cls, uri) == uri
    assert set(uri_of_class.values()) == used  # one class per image, the query image shared with the database's copy


def test_rejects_bad_inputs(case, tmp_path):
    q_uris, q_labels, d_uris, d_labels, systems = case
    bad = SystemResults(top=systems["full pipeline"].top + 100, scores=systems["full pipeline"].scores,
                        ap=systems["full pipeline"].ap)
    with pytest.raises(ValueError, match="indices"):
        write_gallery(tmp_path / "g.html", q_uris, q_labels, d_uris, d_labels, {"x": bad})
    with pytest.raises(ValueError, match="shape"):
        write_gallery(tmp_path / "g.html", q_uris[:3], q_labels[:3], d_uris, d_labels, systems)
    assert not (tmp_path / "g.html").exists()


@pytest.mark.parametrize("reranking", [Reranking(), Reranking(dba_k=3, dba_alpha=3.0, qe_k=2, qe_alpha=3.0),
                                       Reranking(k_reciprocal=KReciprocal(k1=4, k2=2, lambda_value=0.3))],
                         ids=["none", "dba+qe", "k-reciprocal"])
def test_top_results_is_the_evaluation_ranking(reranking):
    rng = np.random.default_rng(0)
    q_labels, d_labels = np.repeat(np.arange(3), 2), np.repeat(np.arange(3), 6)
    centres = rng.normal(size=(3, 16))
    q = centres[q_labels] + rng.normal(scale=1.5, size=(6, 16))
    d = centres[d_labels] + rng.normal(scale=1.5, size=(18, 16))
    q, d = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (q, d))
    res = top_results(q, d, q_labels, d_labels, reranking, k=10)
    assert res.top.shape == res.scores.shape == (6, 10)
    assert (np.diff(res.scores, axis=1) <= 0).all()
    np.testing.assert_allclose(res.ap, score_test(q, q_labels, d, d_labels, reranking).per_query["firearm"]["ap"])
    if reranking == Reranking():
        np.testing.assert_allclose(res.scores, np.sort(q @ d.T, axis=1)[:, ::-1][:, :10], rtol=1e-5)


def test_object_crops_are_outlined_on_their_thumbnails(case, tmp_path):
    q_uris, q_labels, d_uris, d_labels, systems = case
    boxed = q_uris[0]
    with Image.open(boxed) as im:
        width, height = im.size
    box = (width // 4, height // 4, 3 * width // 4, 3 * height // 4)
    path = tmp_path / "g.html"
    write_gallery(path, q_uris, q_labels, d_uris, d_labels, systems, boxes={boxed: box}, boxes_of="full pipeline")
    text = path.read_text(encoding="utf-8")
    root = parse(text)
    css = "".join(n.all_text() for n in root.find_all(lambda n: n.tag == "style"))
    thumbs = dict(re.findall(r"\.(i\d+)\{background-image:url\(data:image/jpeg;base64,([A-Za-z0-9+/=]+)\)\}", css))
    by_uri = {t.attrs["title"].rsplit(" — ", 1)[1]: next(c for c in t.classes() if re.fullmatch(r"i\d+", c))
              for t in root.with_class("thumb")}

    def yellow(uri: str) -> float:
        pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(thumbs[by_uri[uri]]))).convert("RGB"), dtype=int)
        r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
        return float(np.mean((r > 200) & (g > 150) & (b < 90)))

    assert yellow(boxed) > 0.02  # the outline survives the shrinking
    assert all(yellow(u) < yellow(boxed) / 4 for u in by_uri if u != boxed)
    assert "object crops full pipeline describes" in " ".join(n.all_text() for n in root.with_class("crops"))
    plain = tmp_path / "plain.html"
    write_gallery(plain, q_uris, q_labels, d_uris, d_labels, systems)
    assert not parse(plain.read_text(encoding="utf-8")).with_class("crops")
