"""Re-score the audit's label-issue rules on finished bench/audit_bench.py work folders, without training.

Reads each WORK/truth.json and WORK/audit_FxE/{audit.json, pred_probs.npy} (the out-of-fold
probabilities and each image's in-sample probability of its label, learned_probability),
runs `data.label_issues.find_suspects` under each rule and prints precision and recall of
the label issues against the planted files, per folder and pooled:

    python bench/audit_rules.py bench/work/audit_s0 bench/work/audit_s1 bench/work/audit_s2

Rules: cleanlab's two filters alone; with the in-sample check; with the confident
disagreements too (the audit's own rule).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from pipeline.data import label_issues
from pipeline.data.label_issues import WRONG_CLASS, find_suspects

RULES = {  # (CONFIDENT_DISAGREEMENT, LEARNED); 9: never reached
    "cleanlab's filters": (9.0, 9.0),
    "+ in-sample check": (9.0, label_issues.LEARNED),
    "+ confident disagreements (the audit's)": (label_issues.CONFIDENT_DISAGREEMENT, label_issues.LEARNED),
}


def load(work: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], set[str]]:
    audit = next(work.glob("audit_*x*"))
    findings = json.loads((audit / "audit.json").read_text())
    probabilities = np.load(audit / "pred_probs.npy", allow_pickle=False)
    labels = np.array([findings["classes"].index(i["given"]) for i in findings["images"]])
    in_sample = np.zeros_like(probabilities)  # find_suspects reads only the given label's column
    learned = [i["learned_probability"] for i in findings["images"]]  # null where not doubted
    in_sample[np.arange(len(labels)), labels] = [np.nan if x is None else x for x in learned]
    planted = set(json.loads((work / "truth.json").read_text())["planted"])
    return probabilities, in_sample, labels, [i["path"] for i in findings["images"]], planted


def main() -> None:
    folders = [load(Path(w)) for w in sys.argv[1:]]
    if not folders:
        sys.exit(__doc__)
    saved = label_issues.CONFIDENT_DISAGREEMENT, label_issues.LEARNED
    for name, (disagreement, learned) in RULES.items():
        label_issues.CONFIDENT_DISAGREEMENT, label_issues.LEARNED = disagreement, learned
        hits = flagged = planted_n = 0
        each = []
        for probabilities, in_sample, labels, paths, planted in folders:
            suspects = find_suspects(labels, probabilities, in_sample)
            issues = {paths[s["position"]] for s in suspects if s["kind"] == WRONG_CLASS}
            found = len(issues & planted)
            hits, flagged, planted_n = hits + found, flagged + len(issues), planted_n + len(planted)
            each.append(f"{found}/{len(issues)} = {found / len(issues):.3f}, recall {found / len(planted):.3f}")
        print(f"{name}: pooled precision {hits}/{flagged} = {hits / flagged:.3f}, recall {hits}/{planted_n} = "
              f"{hits / planted_n:.3f}; each: " + "; ".join(each))  # fmt: skip
    label_issues.CONFIDENT_DISAGREEMENT, label_issues.LEARNED = saved


if __name__ == "__main__":
    main()
