#!/usr/bin/env bash
# Issue 15: does a text→image model's self-retrieval on its training prompts depend on the sampling settings?
# One image per prompt for each (top_k, guidance) pair, then evaluate-images --retrieval by idx and by text.
#   bash scripts/sampling_sweep.sh runs/q4/t2i_last runs/stamps/64/train.tsv runs/q4/sweep
# (run from the repository root with the venv active; one thread each; prints one line per setting)
set -euo pipefail
MODEL=${1:?model folder}; TABLE=${2:?training table (idx, text, imgbase64)}; OUT=${3:?output folder}
SETTINGS=${SETTINGS:-"1 2.0;2 2.0;4 2.0;8 2.0;16 2.0;16 1.0;4 3.0;4 4.0;16 4.0"}
S=idx:str:1,text:str:1,imgbase64:str:1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
IFS=';' read -ra PAIRS <<< "$SETTINGS"
for pair in "${PAIRS[@]}"; do
  read -r K G <<< "$pair"; O=$OUT/k${K}_g${G}
  tuwen --mode=predict --app_name=text2image_generation --tables="$TABLE" --input_schema=$S --first_sequence=text \
    --outputs=$O.tsv --output_schema=idx,text,gen_imgbase64 --checkpoint_dir="$MODEL" --micro_batch_size=32 \
    --user_defined_parameters "top_k=$K guidance_scale=$G" > $O.log 2>&1
  for M in idx text; do
    tuwen evaluate-images --generated $O.tsv --reference "$TABLE" --retrieval --match $M --output ${O}_$M.json \
      --no_progress > /dev/null 2>&1
  done
  python - "$O" "$K" "$G" <<'PY'
import json, sys
o, k, g = sys.argv[1:]
a, b = (json.load(open(f"{o}_{m}.json"))["retrieval"] for m in ("idx", "text"))
print(f"top_k {k} guidance {g}: by idx pixel {100 * a['pixel']['R@1']:.1f} random {100 * a['random_features']['R@1']:.1f}"
      f" | by text pixel {100 * b['pixel']['R@1']:.1f} random {100 * b['random_features']['R@1']:.1f}", flush=True)
PY
done
