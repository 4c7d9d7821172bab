"""Rebuilds reports/mwe-smollm2/report.{json,md} (and its plots) with the headline table on routers that read
the prompt only, as in `generate`, and the statement-protocol runs in a secondary "scoring-time" table.

It re-tabulates the fit reports on record; it runs no model:
* prompt only (router_input `prompt`, protocol `answer`): per behavior, the largest fit on record (most test
  examples, then most layers swept) among the five advanced-AI-risk behaviors of `reports/mwe-smollm2/bundles/`
  (40/40, 5 layers), the eight persona behaviors as Yes/No answers of `reports/mwe-smollm2-answer/bundles/`
  (60/60, 10 layers) and the larger runs of `reports/mwe-smollm2-100/bundles/` (100/100, 10 layers),
  `reports/mwe-smollm2-20layers/bundles/` (100/100, 20 layers), `reports/mwe-smollm2-400/bundles/` (the whole train
  split of 400 and 200 test examples, 20 layers, on the CPU), `reports/mwe-smollm2-300/bundles/` (two
  advanced-AI-risk behaviors at about 300 train and 150 test examples, 20 layers, on the CPU) and
  `reports/mwe-smollm2-full/bundles/` (the whole splits, about 400/500, all 30 layers: the behaviors whose sweeps
  finished on an H200);
* scoring-time (router_input `prompt+scored`, protocol `statement`): the eight persona behaviors of
  `reports/mwe-smollm2/bundles/`, listed as `<behavior> (statement)`.

Usage: `python reports/headline_prompt_only.py` (from the repository root).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from w2s_hf.defaults import DEFAULT_BASE_MODEL
from w2s_hf.training.report import behavior_entry, load_fit_reports, write_report

REPORTS = Path(__file__).resolve().parent
HEADLINE, PERSONA_ANSWER = REPORTS / "mwe-smollm2", REPORTS / "mwe-smollm2-answer"
LARGER = (REPORTS / "mwe-smollm2-100", REPORTS / "mwe-smollm2-20layers", REPORTS / "mwe-smollm2-400",
          REPORTS / "mwe-smollm2-300", REPORTS / "mwe-smollm2-full")


def scale(report: dict) -> tuple[int, int]:
    entry = behavior_entry(report)
    return entry["n_test"], len(entry["layers_swept"])


def main() -> None:
    own = load_fit_reports(HEADLINE / "bundles")
    prompt_only = {name: report for name, report in own.items() if report["protocol"] != "statement"}
    for folder in (PERSONA_ANSWER, *LARGER):
        for name, report in load_fit_reports(folder / "bundles").items():
            if name not in prompt_only or scale(report) > scale(prompt_only[name]):
                prompt_only[name] = report
    scoring_time = {f"{name} (statement)": report for name, report in own.items() if report["protocol"] == "statement"}
    assert len(prompt_only) == 13 and all(report["protocol"] == "answer" for report in prompt_only.values())
    commands = [line for folder in (HEADLINE, PERSONA_ANSWER, *LARGER)
                for line in (folder / "commands.log").read_text().splitlines() if line.strip()]
    stamp = time.strftime("%Y-%m-%d %H:%M")
    commands.append(f"{stamp} | re-tabulated, no model run | python reports/headline_prompt_only.py")
    path = write_report({**dict(sorted(prompt_only.items())), **scoring_time}, HEADLINE, model=DEFAULT_BASE_MODEL,
                        commands=commands)
    data = json.loads(path.read_text())
    mean = data["mean"]
    print(f"prompt-only mean over {len(prompt_only)}: fixed {mean['fixed']['steerability']:+.3f}, "
          f"W2S bundle {mean['w2s_bundle']['steerability']:+.3f}, oracle {mean['oracle']['steerability']:+.3f}")


if __name__ == "__main__":
    main()
