"""The emotion curve of a conversation: start, end, lowest point, trajectory, turning points.

Pure functions over (turn index, sentiment) points: no scorer, no config object.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

TRAJECTORIES = ("改善", "平稳", "恶化")

# -- the curve --------------------------------------------------------------------------------


def trajectory(delta: float, improve: float, worsen: float) -> str:
    """改善 / 恶化 / 平稳 from end - start, thresholds from config."""
    if delta >= improve:
        return "改善"
    if delta <= -worsen:
        return "恶化"
    return "平稳"


def _agent_near(turns: Sequence[dict[str, Any]], i: int, step: int) -> dict[str, Any] | None:
    j = i + step
    while 0 <= j < len(turns):
        if turns[j].get("speaker") == "agent":
            return {"turn": j, "text": str(turns[j].get("text") or "")}
        j += step
    return None


def summarize_curve(
    points: Sequence[tuple[int, float]], turns: Sequence[dict[str, Any]], improve: float = 0.3, worsen: float = 0.3
) -> dict[str, Any]:
    """Curve statistics from (turn index, sentiment) of the customer's turns, in order.

    Turning points keep the agent turn just before and just after the lowest point and the
    biggest rise (the customer turn that rose most over the previous one): what the agent said
    there is what trainers study. Texts come from `turns`, which are masked already."""
    if not points:
        return {
            "emotion_curve": [],
            "emotion_curve_turns": [],
            "emotion_start": float("nan"),
            "emotion_end": float("nan"),
            "emotion_min": float("nan"),
            "emotion_min_turn": -1,
            "emotion_delta": float("nan"),
            "emotion_trajectory": "平稳",
            "turning_points": {},
        }
    idx = [i for i, _ in points]
    curve = [round(float(s), 4) for _, s in points]
    k_min = int(np.argmin(curve))  # the first lowest point
    start, end = curve[0], curve[-1]
    delta = round(end - start, 4)
    tp: dict[str, Any] = {"lowest": _point(turns, idx[k_min], curve[k_min])}
    rises = [curve[k] - curve[k - 1] for k in range(1, len(curve))]
    if rises and max(rises) > 0:
        k = int(np.argmax(rises)) + 1
        tp["biggest_rise"] = {
            **_point(turns, idx[k], curve[k]),
            "from_turn": idx[k - 1],
            "rise": round(rises[k - 1], 4),
        }
    return {
        "emotion_curve": curve,
        "emotion_curve_turns": idx,
        "emotion_start": start,
        "emotion_end": end,
        "emotion_min": curve[k_min],
        "emotion_min_turn": idx[k_min],
        "emotion_delta": delta,
        "emotion_trajectory": trajectory(delta, improve, worsen),
        "turning_points": tp,
    }


def _point(turns: Sequence[dict[str, Any]], i: int, s: float) -> dict[str, Any]:
    return {
        "turn": i,
        "sentiment": s,
        "customer": str(turns[i].get("text") or ""),
        "agent_before": _agent_near(turns, i, -1),
        "agent_after": _agent_near(turns, i, +1),
    }
