"""Timing-independent evidence about a compiled step: XLA's cost model and its fusion counts."""
from __future__ import annotations

import re
from typing import Any


def stats(compiled: Any) -> dict[str, Any]:
    """FLOPs and bytes accessed (XLA's cost analysis) and the number of top-level fusions and of
    fusions XLA:CPU hands to its matmul library (kCustom) in the compiled step."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    text = compiled.as_text()
    entry = text[text.find("\nENTRY"):]
    return dict(hlo_gflops=round(cost.get("flops", 0.0) / 1e9, 2),
                hlo_mb_accessed=round(cost.get("bytes accessed", 0.0) / 1e6, 1),
                fusions=len(re.findall(r" fusion\(", entry)),
                custom_fusions=entry.count("kind=kCustom"))
