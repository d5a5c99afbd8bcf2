"""The published library as self-contained HTML: one page per issue type and an index (inline
CSS, no scripts, no external links, so a page can be mailed or opened offline)."""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.library.candidates import PART_NAMES, PARTS

_SLUG_RE = re.compile(r"[^\w\u3400-\u9fff-]+")


def slug(s: str) -> str:
    return _SLUG_RE.sub("_", s).strip("_") or "未分类"


_CSS = (
    "body{font-family:system-ui,'PingFang SC','Microsoft YaHei',sans-serif;max-width:960px;margin:2em auto;"
    "padding:0 1em;color:#222}article{border:1px solid #ddd;border-radius:8px;padding:1em;margin:1em 0}"
    "dt{font-weight:bold;color:#555;margin-top:.5em}dd{margin-left:1em}.meta{color:#888;font-size:.85em}"
)


def render_page(issue_type: str, recs: Sequence[dict[str, Any]]) -> str:
    """One self-contained page (inline CSS, no scripts, no external links): the four parts of each
    published case of one issue type."""
    e = html.escape
    arts = []
    for r in recs:
        dl = "".join(f"<dt>{e(PART_NAMES[p])}</dt><dd>{e(str(r.get(p) or ''))}</dd>" for p in PARTS)
        if r.get("turning_point"):
            dl += f"<dt>转折点</dt><dd>{e(str(r['turning_point']))}</dd>"
        arts.append(
            f"<article><h2>案例 {e(str(r['case_id']))}</h2><dl>{dl}</dl>"
            f"<p class='meta'>入选理由：{e(str(r.get('reasons') or ''))}"
            f" · 审核：{e(str(r.get('approved_by') or ''))} · 发布：{e(str(r.get('published_at') or ''))}</p></article>"
        )
    return (
        f"<!doctype html><html lang='zh'><head><meta charset='utf-8'><title>典型案例库 · {e(issue_type)}</title>"
        f"<style>{_CSS}</style></head><body><h1>典型案例库 · {e(issue_type)}</h1>"
        f"<p>{len(recs)} 个案例</p>{''.join(arts)}</body></html>"
    )


def render_index(pages: dict[str, str], df: pd.DataFrame) -> str:
    e = html.escape
    items = "".join(
        f"<li><a href='{e(Path(p).name)}'>{e(t)}</a>（{int((df['issue_type'] == t).sum())}）</li>"
        for t, p in pages.items()
    )
    return (
        f"<!doctype html><html lang='zh'><head><meta charset='utf-8'><title>典型案例库</title>"
        f"<style>{_CSS}</style></head><body><h1>典型案例库</h1><ul>{items}</ul></body></html>"
    )
