"""The report's charts, built as plain plotly.js specs, are the graph-object figures they replaced.

The report built each chart as a plotly graph object, which validated every array element in
Python (the map's thousands of points one call each) and deep-copied the figure to serialise
it. The charts are now written as plain dicts. Validation also *changed* some values (a numpy
scalar became a Python one, a missing hover text its str()), and the report's bytes depend on
the key order, so each test renders the replaced graph-object form beside the new one on data
with the awkward values (missing, empty, numpy scalars in object columns, NaN) and wants the
same JSON, byte for byte, and the same report. The tables, now made from only the rows and
columns they show, are checked against the form that converted whole frames."""

from __future__ import annotations

import html
import itertools
import json
import uuid
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from plotly.io.json import to_json_plotly

from pipeline.insights import report as rp
from pipeline.insights.cluster import ALL_SCOPE

# -- the replaced graph-object forms, as they were ------------------------------------------------


def _ref_layout(fig: Any, title: str, height: int = 420) -> Any:
    fig.update_layout(
        title=title,
        height=height,
        font={"family": rp._FONT, "size": 12},
        margin={"l": 40, "r": 20, "t": 50, "b": 40},
    )
    return fig


def ref_cluster_bar(clusters: pd.DataFrame, top: int = 15) -> Any:
    c = clusters[clusters["scope"] == ALL_SCOPE] if len(clusters) else clusters
    c = c.nlargest(top, "size") if len(c) else c
    names = [f"{r.cluster_id} {r.label}" for r in c.itertuples()] if len(c) else []
    fig = go.Figure(go.Bar(x=c["size"].tolist() if len(c) else [], y=names, orientation="h", marker_color="#4c78a8"))
    fig.update_yaxes(autorange="reversed")
    return _ref_layout(fig, "最大的问题簇（全部案例）", height=max(320, 28 * len(names) + 100))


def ref_issue_bar(members: pd.DataFrame) -> Any:
    m = (
        members.loc[members["scope"] == ALL_SCOPE, [c for c in ("issue_type", "outcome") if c in members]]
        if len(members)
        else members
    )
    fig = go.Figure()
    if len(m):
        tab = pd.crosstab(m["issue_type"], m["outcome"].fillna("unknown"))
        tab = tab.loc[tab.sum(axis=1).sort_values(ascending=False).index]
        for oc in tab.columns:
            fig.add_trace(go.Bar(name=str(oc), x=tab.index.tolist(), y=tab[oc].tolist()))
    fig.update_layout(barmode="stack")
    return _ref_layout(fig, "各问题类型案例数（按处理结果）")


def ref_trend_lines(counts: pd.DataFrame, dimension: str, title: str, top: int = 8) -> Any:
    from pipeline.insights.trends import weekly_series

    w = weekly_series(counts, dimension, top) if len(counts) else counts
    fig = go.Figure()
    for key, g in w.groupby("key") if len(w) else []:
        fig.add_trace(go.Scatter(x=g["period"].tolist(), y=g["count"].tolist(), mode="lines+markers", name=str(key)))
    fig.update_xaxes(title="周（周一）", type="category")
    return _ref_layout(fig, title)


def ref_case_map(points: pd.DataFrame, top: int = 12) -> Any:
    fig = go.Figure()
    if len(points):
        sizes = points[points["cluster_id"].notna()]["cluster_id"].value_counts()
        shown = set(sizes.index[:top])
        groups = points.assign(
            group=[c if c in shown else ("噪声" if c is None or pd.isna(c) else "其他簇") for c in points["cluster_id"]]
        )
        for g, sub in groups.groupby("group", sort=False):
            name = f"{g} {sub['label'].iloc[0]}" if g in shown else str(g)
            grey = g in ("噪声", "其他簇")
            fig.add_trace(
                go.Scatter(
                    x=sub["x"].round(4).tolist(),
                    y=sub["y"].round(4).tolist(),
                    mode="markers",
                    name=name[:30],
                    text=sub["text"].str.slice(0, 60).tolist(),
                    hovertemplate="%{text}<extra>" + html.escape(name[:30]) + "</extra>",
                    marker={
                        "size": 6,
                        "opacity": 0.35 if grey else 0.8,
                        **({"color": "#bbbbbb"} if g == "噪声" else {}),
                    },
                )
            )
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    return _ref_layout(fig, "案例语义地图（按问题簇着色）", height=560)


def ref_trajectory_bar(emotion: pd.DataFrame, dimension: str = "issue_type") -> Any:
    d = emotion[emotion["dimension"] == dimension] if len(emotion) else emotion
    fig = go.Figure()
    colors = {"改善": "#2e7d32", "平稳": "#9e9e9e", "恶化": "#c62828"}
    for t in ("改善", "平稳", "恶化"):
        fig.add_bar(
            name=t,
            x=d["key"].tolist() if len(d) else [],
            y=d[f"share_{t}"].tolist() if len(d) else [],
            marker_color=colors[t],
        )
    fig.update_layout(barmode="stack", yaxis_tickformat=".0%")
    return _ref_layout(fig, "情绪走向（按问题类型）")


def ref_table_html(df: pd.DataFrame, columns: dict[str, str], max_rows: int = 50, row_class: str | None = None) -> str:
    if df is None or df.empty:
        return '<p class="note">（无数据）</p>'
    cols = [c for c in columns if c in df]
    head = "".join(f"<th>{html.escape(columns[c])}</th>" for c in cols)
    body = []
    for r in df.head(max_rows).to_dict("records"):
        cls = f' class="{row_class}"' if row_class and r.get(row_class) else ""
        cells = "".join(f"<td>{html.escape(rp._cell(r[c]))}</td>" for c in cols)
        body.append(f"<tr{cls}>{cells}</tr>")
    more = (
        f'<p class="note">仅显示前 {max_rows} 行，共 {len(df)} 行；完整数据见同目录的 CSV/Parquet。</p>'
        if len(df) > max_rows
        else ""
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{more}"


def ref_fig_html(fig: Any, first: bool) -> str:
    import plotly.io as pio

    spec = fig.to_plotly_json()
    spec["layout"]["template"] = rp._template()
    return pio.to_html(
        spec, full_html=False, include_plotlyjs=True if first else False, config=rp._PLOT_CONFIG, validate=False
    )


# -- data with the awkward values ----------------------------------------------------------------


def _awkward() -> rp.ReportData:
    rng = np.random.default_rng(5)
    ids = [f"C{i:04d}" for i in range(15)]
    clusters = pd.DataFrame(
        {
            "cluster_id": ids + ["C0100", "C0101"],
            "scope": [ALL_SCOPE] * 15 + ["物流配送", "发票"],
            "label": ["物流、慢"] * 14 + [np.nan, "发票", pd.NA],
            "size": [40, 40, 7, 3, 90, 1, 5, 5, 12, 9, 8, 2, 2, 30, 11, 4, 6],  # ties: nlargest's order kept
        }
    )
    outcomes = ["resolved", "unresolved", None, np.nan, "escalated"]
    types = ["物流配送", "发票", "退换货/退款", None, "质量问题"]
    members = pd.DataFrame(
        {
            "scope": [ALL_SCOPE] * 60 + ["物流配送"] * 5,
            # a type and an outcome seen only in a per-type scope: no row or column of the chart
            "issue_type": [types[i % 5] for i in range(64)] + ["仅在分类内"],
            "outcome": pd.Series([outcomes[(i * 3) % 5] for i in range(64)] + ["transferred"], dtype="str"),
            "problem": ["x"] * 65,
        }
    )
    weeks = ["2025-10-06", "2025-10-20", "2025-10-27"]  # a week with no cases between
    counts = pd.DataFrame(
        [
            {"dimension": d, "granularity": g, "breakdown": "all", "key": k, "period": w, "count": n}
            for d, keys in (("issue_type", ["物流配送", "发票", "质量问题"]), ("cluster", ids[:10]))
            for k in keys
            for w, n in zip(weeks, rng.integers(0, 9, 3).tolist())
            for g in ("week", "day")
        ]
    )
    n = 80
    cid = [ids[i % 14] if i % 7 else None for i in range(n)]
    cid[3] = np.nan  # noise written as NaN as well as None
    texts = pd.Series([f"问题描述{i}" * (i % 9) for i in range(n)], dtype="string")  # pd.NA for missing
    texts[5] = pd.NA
    texts[6] = ""
    x = rng.normal(size=n)
    x[8] = np.nan
    points = pd.DataFrame(
        {
            "x": x,
            "y": rng.normal(size=n),
            "cluster_id": cid,
            "label": pd.Series([np.nan if i % 5 == 0 else "标签" for i in range(n)], dtype="str"),
            "text": texts,
        }
    )
    emotion = pd.DataFrame(
        {
            "dimension": ["issue_type"] * 3 + ["channel"],
            "key": ["物流配送", "发票", None, "app"],
            # float32 scalars in an object column: validation printed them as Python floats
            "share_改善": pd.Series([np.float32(0.3), np.float32(0.1), np.nan, 0.5], dtype=object),
            "share_平稳": [0.5, np.nan, 0.2, 0.25],
            "share_恶化": [0.2, 0.9, 0.8, 0.25],
        }
    )
    alerts = pd.DataFrame(
        {
            "key": ["C0001", "C0002", "C0003"],
            "this_week": [3, 9, 0],
            "last_week": [1, 0, 2],
            "emerging": [True, False, False],
            "alert": [False, True, np.nan],
            "p_value": [0.5, 0.001, np.nan],
        }
    )
    # a list column, a missing value, more rows than shown and a column no table shows
    matrix = pd.DataFrame(
        {
            "issue_type": ["物流配送", None] * 31,
            "cause_phrases": [["慢", "丢件"], []] * 31,
            "count": np.arange(62),
            "share_of_issue_type": np.linspace(0, 2, 62),
            "unshown": [{"a": 1}] * 62,
        }
    )
    return rp.ReportData(
        export_date="2025-11-01",
        as_of="2025-10-31",
        n_cases=100,
        n_clustered=80,
        clusters=clusters,
        members=members,
        alerts=alerts,
        counts=counts,
        matrix=matrix,
        kpis=pd.DataFrame(),
        map_points=points,
        notes=["注释 <b>"],
        emotion=emotion,
    )


def _only_noise() -> rp.ReportData:
    d = _awkward()
    d.map_points = d.map_points.assign(cluster_id=None)
    d.members = d.members.assign(outcome=None)
    return d


def _empty() -> rp.ReportData:
    e = pd.DataFrame()
    return rp.ReportData("2025-11-01", None, 0, 0, e, e, e, e, e, e, e, [])


DATA = {"awkward": _awkward, "only_noise": _only_noise, "empty": _empty}

PAIRS = [
    (ref_cluster_bar, rp.cluster_bar, lambda d: (d.clusters,)),
    (ref_issue_bar, rp.issue_bar, lambda d: (d.members,)),
    (ref_trend_lines, rp.trend_lines, lambda d: (d.counts, "issue_type", "t")),
    (ref_trend_lines, rp.trend_lines, lambda d: (d.counts, "cluster", "t")),
    (ref_case_map, rp.case_map, lambda d: (d.map_points,)),
    (ref_case_map, rp.case_map, lambda d: (d.map_points, 3)),  # most clusters lumped as 其他簇
    (ref_trajectory_bar, rp.trajectory_bar, lambda d: (d.emotion,)),
]


@pytest.mark.parametrize("name", DATA)
@pytest.mark.parametrize("pair", range(len(PAIRS)))
def test_each_chart_is_the_graph_object_chart_it_replaced(name, pair):
    ref, new, args = PAIRS[pair]
    data = DATA[name]()
    want = ref(*args(data)).to_plotly_json()
    want["layout"]["template"] = rp._template()
    # the JSON text the report embeds: values, their printed form and key order
    assert to_json_plotly(new(*args(data))) == to_json_plotly(want)


def _fixed_ids(monkeypatch) -> None:
    """plotly names each chart's div by uuid4: number them so two renderings can be compared."""
    n = itertools.count()
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=next(n)))


@pytest.mark.parametrize("name", DATA)
def test_report_is_byte_identical_to_the_graph_object_rendering(name, monkeypatch):
    data = DATA[name]()
    with monkeypatch.context() as m:
        _fixed_ids(m)
        got = rp.render_report(data)
    with monkeypatch.context() as m:
        _fixed_ids(m)
        for attr, ref in (
            ("cluster_bar", ref_cluster_bar),
            ("issue_bar", ref_issue_bar),
            ("trend_lines", ref_trend_lines),
            ("case_map", ref_case_map),
            ("trajectory_bar", ref_trajectory_bar),
            ("_fig_html", ref_fig_html),
            ("table_html", ref_table_html),
        ):
            m.setattr(rp, attr, ref)
        want = rp.render_report(data)
    assert got.count("Plotly.newPlot") == 6
    assert got == want


@pytest.mark.parametrize("name", DATA)
def test_each_table_is_the_table_it_replaced(name):
    d = DATA[name]()
    shown = {"key": "编号", "alert": "预警", "p_value": "p", "issue_type": "类型", "cause_phrases": "原因"}
    for df in (d.alerts, d.matrix, d.clusters, d.members):
        for columns, row_class, max_rows in ((shown, None, 50), (shown, "alert", 2), ({"key": "编号"}, "alert", 50)):
            # a row class from a column the table does not show still marks its rows
            assert rp.table_html(df, columns, max_rows, row_class) == ref_table_html(df, columns, max_rows, row_class)


def test_template_read_from_plotlys_file_is_the_template_objects_json():
    import plotly.io as pio

    want = pio.templates["plotly_white"].to_plotly_json()
    rp._template.cache_clear()
    got = rp._template()
    # As text: the report writes the dict in its key order, so the order must match too.
    assert json.dumps(got, ensure_ascii=False) == json.dumps(want, ensure_ascii=False)
