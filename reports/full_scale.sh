#!/usr/bin/env bash
# Issue 21 at full scale, prepared as one script for a machine with a GPU: the 13 MWE behaviors on the packaged
# SmolLM2-135M-Instruct with every layer swept, the whole train (40 %) and test (50 %) splits, multipliers -2 0 2
# (the grid of every report on record; steerability is the slope over it), the `answer` protocol (the router reads
# the prompt only, as in `generate`) and `--router best`. Rerun the same command after a timeout: every finished
# sweep unit is read back from the caches, so only the rest of the sweeps runs again.
#
#   bash reports/full_scale.sh OUTPUT [BEHAVIOR ...]        (default: all 13 behaviors)
#
# Environment, for a smaller run (a dry run on a CPU): LAYERS (default: every layer), MAX_TRAIN and MAX_EVAL
# (default: the whole splits), BATCH_SIZE (rows per forward, default 512), W2S_HF (default: `w2s-hf`, or
# `python3 -m w2s_hf.cli` where the package is not installed). The model runs on the GPU when torch sees one
# (`--device auto`). Memory: a steered forward's logits take rows x answer positions x 49,152 x 4 bytes, 14.7 GiB
# at 256 rows on awareness-good's long answers; five of these runs side by side at 256 ran an H200 out of memory
# (bench/RESULTS.md), one alone at 512 needs about twice that.
# OUTPUT/commands.log gains one line per run: date | wall time | machine | sweep evaluations computed and
# evaluations/s | command. Tabulate with reports/headline_prompt_only.py (copy OUTPUT/bundles into a report folder).
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: bash reports/full_scale.sh OUTPUT [BEHAVIOR ...]" >&2
  exit 2
fi
output=$1
shift
behaviors=("$@")
if [ ${#behaviors[@]} -eq 0 ]; then
  behaviors=(anti-LGBTQ awareness-good awareness-llm awareness-web corrigible deontology myopic narcissism
             not-threat not-watched openness physical-force utilitarianism)
fi
w2s_hf=${W2S_HF:-$(command -v w2s-hf || echo "python3 -m w2s_hf.cli")}
command=($w2s_hf eval -q --behaviors "${behaviors[@]}" --protocol answer --router best --multipliers -2 0 2
         --batch-size "${BATCH_SIZE:-512}" --output "$output")
[ -n "${LAYERS:-}" ] && command+=(--layers $LAYERS)
[ -n "${MAX_TRAIN:-}" ] && command+=(--max-train "$MAX_TRAIN")
[ -n "${MAX_EVAL:-}" ] && command+=(--max-eval "$MAX_EVAL")

machine=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)
machine="${machine:-CPU only} ($(uname -m), $(nproc) cores)"
mkdir -p "$output"
start=$(date +%s)
"${command[@]}"
end=$(date +%s)

evaluations=$(python3 - "$output" "$start" <<'EOF'
"""Sweep evaluations computed by this run: every cache unit written since it started, items x 2 steered multipliers."""
import pathlib, re, sys

output, start = pathlib.Path(sys.argv[1]), float(sys.argv[2])
total = 0
for unit in output.glob("bundles/*/cache/*/chunk*.npy"):
    if unit.stat().st_mtime >= start:
        first, last, _ = map(int, re.fullmatch(r"chunk(\d+)-(\d+)-layer(\d+)", unit.stem).groups())
        total += (last - first) * 2
print(total)
EOF
)
seconds=$((end - start))
rate=$(python3 -c "print(f'{$evaluations / max($seconds, 1):.1f}')")
echo "$(date -u '+%Y-%m-%d %H:%M') | $((seconds / 60)) min $((seconds % 60)) s | $machine | $evaluations sweep evaluations, $rate evaluations/s over the whole run (fit, sweeps, routers, reports) | ${command[*]}" \
  | tee -a "$output/commands.log"
