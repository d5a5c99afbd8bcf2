"""The self-contained HTML report: charts and tables from one export, openable with no server.

Why one file with plotly.js inline: the report is mailed around and opened on laptops with no
network (and must not call a CDN from inside a company network), so everything it needs is in
the file. Why SVG scatter and not WebGL: it renders in any browser, headless ones included.
Pure: tables in, an HTML string out; `pipeline.insights.export` writes it.
"""

from __future__ import annotations

import functools
import html
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from pipeline.insights.cluster import ALL_SCOPE
from pipeline.insights.codes import filled_codes, sorted_codes

_PLOT_CONFIG = {"displaylogo": False, "responsive": True}
_FONT = "PingFang SC, Microsoft YaHei, Noto Sans CJK SC, WenQuanYi Micro Hei, sans-serif"
_STYLE = (
    """
body{font-family:%s;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{font-size:24px} h2{font-size:19px;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px;width:100%%;margin:8px 0}
th,td{border:1px solid #e2e2e2;padding:4px 6px;text-align:left;vertical-align:top}
th{background:#f5f5f5} tr.alert td{background:#fff1f0} .note{color:#666;font-size:13px}
.tag{display:inline-block;padding:0 6px;border-radius:8px;background:#eef;font-size:12px}
.new{background:#e6f7e6} .suggest{color:#a15c00;font-size:12px}
"""
    % _FONT
)


@dataclass
class ReportData:
    """Everything the report shows, as produced by the export."""

    export_date: str
    as_of: str | None
    n_cases: int
    n_clustered: int
    clusters: pd.DataFrame
    members: pd.DataFrame
    alerts: pd.DataFrame
    counts: pd.DataFrame
    matrix: pd.DataFrame
    kpis: pd.DataFrame
    map_points: pd.DataFrame  # x, y, cluster_id, label, text
    notes: list[str]
    emotion: pd.DataFrame = field(default_factory=pd.DataFrame)  # trajectory shares per dimension
    emotion_relations: pd.DataFrame = field(default_factory=pd.DataFrame)
    emotion_teams: pd.DataFrame = field(default_factory=pd.DataFrame)


def map_coordinates(X: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D coordinates of the cases for the map (PCA: deterministic and fast at 100k points)."""
    if len(X) < 3:
        return np.zeros((len(X), 2))
    from sklearn.decomposition import PCA

    return PCA(n_components=2, random_state=seed).fit_transform(np.asarray(X, dtype=np.float32))


# Figures are plain plotly.js specs, {"data": [traces], "layout": {...}}, not graph objects: building
# a go.Figure validated every element of every array (the map's 5k points, one Python call each),
# then deep-copied it all again in to_plotly_json -- over half the report's time, to check values
# this module writes itself. Keys go in the order the graph objects wrote them (trace properties
# alphabetical, then "type"), so the report's bytes stay as they were.
Figure = dict[str, Any]


@functools.cache
def _template() -> dict[str, Any]:
    """plotly_white as JSON, made once: naming it in each figure's layout deep-copied the whole
    template per chart (a quarter of the report's time). Read from plotly's own file of it, the
    one `pio.templates` reads: it builds a Template object of every key (40 ms, in each night's
    one report) that `to_plotly_json` turns back into the file's dict, "data" first."""
    import pkgutil

    raw = pkgutil.get_data("plotly", "package_data/templates/plotly_white.json")
    spec = json.loads(raw) if raw else {}
    if not spec or set(spec) - {"data", "layout"}:  # not the form it had: plotly's way
        import plotly.io as pio

        return pio.templates["plotly_white"].to_plotly_json()
    return {k: spec[k] for k in ("data", "layout") if k in spec}


def _fig_html(fig: Figure, first: bool) -> str:
    import plotly.io as pio

    # plotly.js goes inline once, with the first chart; later charts reuse it.
    return pio.to_html(
        fig, full_html=False, include_plotlyjs=True if first else False, config=_PLOT_CONFIG, validate=False
    )


def _figure(traces: list[dict[str, Any]], axes: dict[str, Any], title: str, height: int = 420) -> Figure:
    """A figure in the shared look: `axes` are the chart's own layout keys (axes, barmode)."""
    return {
        "data": traces,
        "layout": {
            "template": _template(),
            **axes,
            "font": {"family": _FONT, "size": 12},
            "margin": {"l": 40, "r": 20, "t": 50, "b": 40},
            "title": {"text": title},
            "height": height,
        },
    }


def _values(s: pd.Series | pd.Index | np.ndarray) -> list[Any]:
    """A column as a list of Python scalars, as plotly's validation made it (an object column
    may hold numpy scalars, which the JSON writer would print in their own precision)."""
    v = s.tolist()
    return [x.item() if isinstance(x, np.generic) else x for x in v] if s.dtype == object else v


def _texts(s: pd.Series) -> list[str | None]:
    """Hover texts as strings, None kept: plotly's string validation wrote a missing text (NaN,
    pd.NA) as its str()."""
    return [t if t is None or isinstance(t, str) else str(t) for t in s.tolist()]


def cluster_bar(clusters: pd.DataFrame, top: int = 15) -> Figure:
    """Largest cross-type clusters, labelled by their root-cause label."""
    # The three columns shown, filtered: a filter copies every column it keeps (the clusters'
    # list columns too).
    c = clusters.loc[clusters["scope"] == ALL_SCOPE, ["cluster_id", "label", "size"]] if len(clusters) else clusters
    c = c.nlargest(top, "size") if len(c) else c
    names = [f"{r.cluster_id} {r.label}" for r in c.itertuples()] if len(c) else []
    bar = {
        "marker": {"color": "#4c78a8"},
        "orientation": "h",
        "x": _values(c["size"]) if len(c) else [],
        "y": names,
        "type": "bar",
    }
    return _figure(
        [bar], {"yaxis": {"autorange": "reversed"}}, "最大的问题簇（全部案例）", height=max(320, 28 * len(names) + 100)
    )


def issue_bar(members: pd.DataFrame) -> Figure:
    """Cases per issue type, stacked by outcome (how much of each type is left unresolved)."""
    bars = []
    if len(members):
        tab = _outcome_table(members)
        tab = tab.loc[tab.sum(axis=1).sort_values(ascending=False).index]
        x = _values(tab.index)
        bars = [{"name": str(oc), "x": x, "y": _values(tab[oc]), "type": "bar"} for oc in tab.columns]
    return _figure(bars, {"barmode": "stack"}, "各问题类型案例数（按处理结果）")


def _outcome_table(members: pd.DataFrame) -> pd.DataFrame:
    """The cross-type members counted by issue type (rows) and outcome (columns, a missing one
    "unknown"), both sorted, as `pd.crosstab` counted them: counted here on integer codes, as the
    crosstab of an all-history members frame was most of this chart's time."""
    keep = (members["scope"] == ALL_SCOPE).to_numpy()
    # The columns' shared codes (`codes.sorted_codes`); missing types: -1, left out as crosstab did.
    types, type_names = sorted_codes(members["issue_type"])
    outcomes, outcome_names = filled_codes(members["outcome"], "unknown")
    types, outcomes = types[keep], outcomes[keep]
    ok = (types >= 0) & (outcomes >= 0)
    n = np.bincount(types[ok] * len(outcome_names) + outcomes[ok], minlength=len(type_names) * len(outcome_names))
    n = n.reshape(len(type_names), len(outcome_names))
    # Values seen only outside the cross-type scope are no row or column of the crosstab.
    rows, cols = np.flatnonzero(n.any(axis=1)), np.flatnonzero(n.any(axis=0))
    return pd.DataFrame(n[np.ix_(rows, cols)], index=type_names[rows], columns=outcome_names[cols])


def trend_lines(counts: pd.DataFrame, dimension: str, title: str, top: int = 8) -> Figure:
    """Weekly counts of the largest keys of one dimension."""
    from pipeline.insights.trends import weekly_series

    w = weekly_series(counts, dimension, top) if len(counts) else counts
    lines = [
        {
            "mode": "lines+markers",
            "name": str(key),
            "x": _values(g["period"]),
            "y": _values(g["count"]),
            "type": "scatter",
        }
        for key, g in (w.groupby("key") if len(w) else [])
    ]
    # weeks are labels, not instants
    return _figure(lines, {"xaxis": {"title": {"text": "周（周一）"}, "type": "category"}}, title)


def case_map(points: pd.DataFrame, top: int = 12) -> Figure:
    """Cases in 2-D coloured by cluster; noise grey. Hover shows the masked problem."""
    traces = []
    if len(points):
        ids = points["cluster_id"]
        shown = set(ids[ids.notna()].value_counts().index[:top])
        group = [c if c in shown else ("噪声" if c is None or pd.isna(c) else "其他簇") for c in ids]
        # Each group's points taken by position from columns converted once: a groupby built a
        # frame per group and rounded, sliced and converted each group's columns apart. Groups
        # in order of first appearance, as groupby(sort=False) gave them.
        codes, groups = pd.factorize(np.array(group, dtype=object))
        x, y = points["x"].round(4).to_numpy(), points["y"].round(4).to_numpy()
        texts = np.array(_texts(points["text"].str.slice(0, 60)), dtype=object)
        for k, g in enumerate(groups):
            rows = np.flatnonzero(codes == k)
            name = f"{g} {points['label'].iloc[rows[0]]}" if g in shown else str(g)
            grey = g in ("噪声", "其他簇")
            traces.append(
                {
                    "hovertemplate": "%{text}<extra>" + html.escape(name[:30]) + "</extra>",
                    "marker": {
                        **({"color": "#bbbbbb"} if g == "噪声" else {}),
                        "opacity": 0.35 if grey else 0.8,
                        "size": 6,
                    },
                    "mode": "markers",
                    "name": name[:30],
                    "text": texts[rows].tolist(),
                    "x": _values(x[rows]),
                    "y": _values(y[rows]),
                    "type": "scatter",
                }
            )
    return _figure(
        traces,
        {"xaxis": {"showticklabels": False}, "yaxis": {"showticklabels": False}},
        "案例语义地图（按问题簇着色）",
        height=560,
    )


def trajectory_bar(emotion: pd.DataFrame, dimension: str = "issue_type") -> Figure:
    """Stacked shares of 改善 / 平稳 / 恶化 per issue type."""
    d = emotion[emotion["dimension"] == dimension] if len(emotion) else emotion
    colors = {"改善": "#2e7d32", "平稳": "#9e9e9e", "恶化": "#c62828"}
    bars = [
        {
            "marker": {"color": colors[t]},
            "name": t,
            "x": _values(d["key"]) if len(d) else [],
            "y": _values(d[f"share_{t}"]) if len(d) else [],
            "type": "bar",
        }
        for t in ("改善", "平稳", "恶化")
    ]
    return _figure(bars, {"yaxis": {"tickformat": ".0%"}, "barmode": "stack"}, "情绪走向（按问题类型）")


def table_html(df: pd.DataFrame, columns: dict[str, str], max_rows: int = 50, row_class: str | None = None) -> str:
    """A plain escaped HTML table of selected columns with Chinese headers."""
    if df is None or df.empty:
        return '<p class="note">（无数据）</p>'
    cols = [c for c in columns if c in df]
    head = "".join(f"<th>{html.escape(columns[c])}</th>" for c in cols)
    # Only the shown rows and columns made into dicts: the clusters' list columns are most of the
    # conversion and none is shown whole.
    keep = cols + [row_class] if row_class and row_class in df and row_class not in cols else cols
    body = []
    for r in df.head(max_rows)[keep].to_dict("records"):
        cls = f' class="{row_class}"' if row_class and r.get(row_class) else ""
        cells = "".join(f"<td>{html.escape(_cell(r[c]))}</td>" for c in cols)
        body.append(f"<tr{cls}>{cells}</tr>")
    more = (
        f'<p class="note">仅显示前 {max_rows} 行，共 {len(df)} 行；完整数据见同目录的 CSV/Parquet。</p>'
        if len(df) > max_rows
        else ""
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{more}"


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    if isinstance(v, (list, tuple, np.ndarray)):
        return "；".join(str(x) for x in v)
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1 else f"{v:.1f}"
    if isinstance(v, (bool, np.bool_)):
        return "是" if v else ""
    return str(v)


def _alerts_html(alerts: pd.DataFrame) -> str:
    """The alerts table, or why there is none: with no previous week in the data nothing can be
    compared, and a table of "0 last week" rows would only look alarming."""
    if not len(alerts) or alerts["last_week"].sum() == 0:
        return '<p class="note">数据中还没有上周的案例：本周的数量已计入趋势，预警从有上周数据起开始计算。</p>'
    return table_html(
        alerts,
        {
            "dimension": "维度",
            "key": "编号/类型",
            "label": "标签",
            "this_week": "本周",
            "last_week": "上周",
            "change": "变化",
            "p_value": "p 值",
            "alert": "预警",
            "is_new": "新簇",
            "emerging": "新兴",
        },
        row_class="alert",
    )


_NOTE_EMOTION_CURVE = (
    "每个客户回合的情绪得分连成曲线；终点减起点超过阈值为改善或恶化。"
    "相关系数附 95% 自助法置信区间：区间跨过 0 即看不出关系。"
)
_NOTE_FOOTER = (
    "由 casemine 生成；无需网络即可打开。数据表：clusters、members、trends、alerts、matrix、kpis、"
    "emotion、emotion_relations、emotion_teams（CSV 与 Parquet）。"
)


def render_report(data: ReportData) -> str:
    """The whole report as one HTML document."""
    figs = [
        cluster_bar(data.clusters),
        issue_bar(data.members),
        trend_lines(data.counts, "issue_type", "每周案例数（问题类型）"),
        trend_lines(data.counts, "cluster", "每周案例数（问题簇）"),
        case_map(data.map_points),
        trajectory_bar(data.emotion),
    ]
    charts = [_fig_html(f, i == 0) for i, f in enumerate(figs)]
    per_type = data.clusters[data.clusters["scope"] != ALL_SCOPE] if len(data.clusters) else data.clusters
    # Emerging and alerting rows sort first; the next largest movers follow for context.
    alerts = data.alerts.head(max(15, int(data.alerts["emerging"].sum()) + 5)) if len(data.alerts) else data.alerts
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in data.notes)
    return f"""<!DOCTYPE html>
<html lang="zh-CN"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>casemine 问题根因报告 {html.escape(data.export_date)}</title><style>{_STYLE}</style></head>
<body>
<h1>casemine 问题根因报告</h1>
<p>导出日期 {html.escape(data.export_date)} · 数据截至 {html.escape(data.as_of or "—")} ·
案例 {data.n_cases} 个，参与聚类 {data.n_clustered} 个 · 文本均已脱敏。</p>
<ul class="note">{notes}</ul>
<p class="suggest">原因类别与原因短语为规则匹配得到的<b>建议</b>，需人工确认。</p>

<h2>预警与新兴问题（本周 vs 上周）</h2>
<p class="note">单侧条件二项检验：本周数 ≥ 最低计数且 p 值低于阈值才预警（红色）；新出现的簇与预警排在最前。</p>
{_alerts_html(alerts)}

<h2>问题簇</h2>
{charts[0]}
{charts[1]}

<h2>趋势</h2>
{charts[2]}
{charts[3]}

<h2>案例地图</h2>
{charts[4]}

<h2>根因矩阵：问题类型 → 问题簇（直接原因）→ 原因类别 → 影响</h2>
{
        table_html(
            data.matrix,
            {
                "issue_type": "问题类型",
                "cluster_id": "簇",
                "label": "标签",
                "cause_phrases": "直接原因（建议）",
                "cause_category_zh": "原因类别（建议）",
                "count": "案例数",
                "share_of_issue_type": "占该类型",
                "top_regions": "主要地区",
                "top_products": "主要产品",
            },
            max_rows=60,
        )
    }

<h2>各问题类型内的簇</h2>
{
        table_html(
            per_type,
            {
                "cluster_id": "簇",
                "scope": "问题类型",
                "label": "标签",
                "size": "案例数",
                "share_of_scope": "占该类型",
                "share_unresolved": "未解决",
                "share_escalated": "升级",
                "mean_emotion": "平均情绪",
                "cause_phrases": "直接原因（建议）",
                "cause_category_zh": "原因类别（建议）",
                "representative_texts": "代表案例",
                "is_new": "新簇",
            },
            max_rows=60,
        )
    }

<h2>客户情绪走向</h2>
<p class="note">{_NOTE_EMOTION_CURVE}</p>
{charts[5]}
{
        table_html(
            data.emotion_relations,
            {
                "measure": "情绪指标",
                "outcome_measure": "结果",
                "method": "方法",
                "n": "案例数",
                "r": "相关系数",
                "ci_low": "下限",
                "ci_high": "上限",
                "note": "解读",
            },
        )
    }
{
        table_html(
            data.emotion_teams,
            {
                "team": "班组/坐席",
                "n": "会话数",
                "worsened": "恶化",
                "share_worsened": "恶化占比",
                "ci_low": "下限",
                "ci_high": "上限",
            },
            max_rows=30,
        )
    }

<h2>服务指标（KPI）</h2>
{
        table_html(
            data.kpis,
            {
                "group_by": "维度",
                "group": "分组",
                "n_cases": "案例数",
                "n_with_first_response": "有首响时间",
                "first_response_median_s": "首响中位数(秒)",
                "n_with_duration": "有处理时长",
                "duration_median_s": "处理时长中位数(秒)",
                "resolution_rate": "解决率",
                "escalation_rate": "升级率",
                "n_outcome_unknown": "结果未知",
            },
            max_rows=80,
        )
    }
<p class="note">{_NOTE_FOOTER}</p>
</body></html>
"""


def report_json_summary(data: ReportData) -> dict[str, Any]:
    return json.loads(json.dumps({"n_cases": data.n_cases, "n_clustered": data.n_clustered}))
