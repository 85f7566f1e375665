#!/usr/bin/env bash
# Reproduces the demo text→image model shipped in src/tuwen/assets/demo_t2i/ with tuwen's own commands,
# on 2 CPU cores in about an hour (no download): synthetic data → VQGAN → codes → GPT → evaluation → export.
#
#   bash scripts/train_demo.sh [WORK_DIR]        # default: runs/demo
#
# Set DEVICE=cuda to train on a GPU (much faster), EXPORT=0 to leave the shipped model untouched.
set -euo pipefail
W=${1:-runs/demo}
DEVICE=${DEVICE:-auto}
EXPORT=${EXPORT:-1}
VQ_STEPS=${VQ_STEPS:-2000}
VQ2_STEPS=${VQ2_STEPS:-1000}
GPT_STEPS=${GPT_STEPS:-4000}
mkdir -p "$W"
SCHEMA=idx:str:1,text:str:1,imgbase64:str:1

# 1. 20000 synthetic 64 px images with Chinese captions; 4 colour/shape pairs are held out of train/val/test
#    (red triangle, yellow circle, blue square, purple rectangle) and written to holdout.tsv.
[ -f "$W/data/meta.json" ] || tuwen data synth --out "$W/data" --size 64 --n 20000 --seed 0 --holdout

# 2. VQGAN image tokenizer: tiny preset (f8: 64 px → 8×8 codes, 512-entry codebook), L1 + 2·L2, dead-code
#    restarts, no discriminator (flat shapes on plain backgrounds do not need one); then a second, lower-lr stage.
[ -f "$W/vq1/model.safetensors" ] || tuwen vq train --tables "$W/data/train.tsv,$W/data/val.tsv" \
  --input_schema $SCHEMA --second_sequence imgbase64 --checkpoint_dir "$W/vq1" --preset tiny --size 64 \
  --micro_batch_size 32 --learning_rate 1e-3 --lr_schedule cosine --max_steps "$VQ_STEPS" --l2_weight 2 \
  --dead_code_steps 50 --logging_steps 100 --save_checkpoint_steps 500 --device "$DEVICE" --no_progress
[ -f "$W/vq/model.safetensors" ] || tuwen vq train --tables "$W/data/train.tsv,$W/data/val.tsv" \
  --input_schema $SCHEMA --second_sequence imgbase64 --checkpoint_dir "$W/vq" --init "$W/vq1" --preset tiny \
  --size 64 --micro_batch_size 32 --learning_rate 4e-4 --warmup_proportion 0.01 --lr_schedule cosine \
  --max_steps "$VQ2_STEPS" --l2_weight 2 --dead_code_steps 50 --logging_steps 100 --save_checkpoint_steps 500 \
  --device "$DEVICE" --no_progress

# 3. pre-tokenize the images once (the GPT then trains on codes, not pixels)
for s in train val; do
  [ -f "$W/codes_$s/meta.json" ] || tuwen vq tokenize --model "$W/vq" --tables "$W/data/$s.tsv" \
    --input_schema $SCHEMA --first_sequence text --second_sequence imgbase64 --out "$W/codes_$s" --device "$DEVICE"
done

# 4. the GPT, with EasyNLP's command line (tuwen builds the WordPiece vocabulary from the captions);
#    cfg_drop_prob=0.1 trains the unconditional prompt for classifier-free guidance.
[ -f "$W/t2i/model.safetensors" ] || tuwen --mode=train --app_name=text2image_generation \
  --tables="$W/codes_train,$W/codes_val" --input_schema=$SCHEMA --first_sequence=text --second_sequence=imgbase64 \
  --checkpoint_dir="$W/t2i" --learning_rate=1e-3 --epoch_num=100 --max_steps="$GPT_STEPS" --random_seed=42 \
  --logging_steps=50 --save_checkpoint_steps=1000 --micro_batch_size=64 --lr_schedule cosine --device "$DEVICE" \
  --no_progress --user_defined_parameters="size=64 text_len=32 img_len=64 img_vocab_size=512 vqgan_ckpt_path=$W/vq \
n_layer=4 n_head=4 n_embd=256 dropout=0.0 cfg_drop_prob=0.1"

# 5. attribute accuracy of generated images on held-out combinations and on seen ones (test prompts)
for s in holdout test; do
  tuwen --mode=evaluate --app_name=text2image_generation --tables="$W/data/$s.tsv" --input_schema=$SCHEMA \
    --first_sequence=text --second_sequence=imgbase64 --checkpoint_dir="$W/t2i" --micro_batch_size=64 --random_seed=0 \
    --metric attributes --device "$DEVICE" --user_defined_parameters="eval_num=256 max_generated_num=1" \
    | tee "$W/eval_$s.txt"
done

# 6. export (fp16 weights, loaded back as fp32) into the package
if [ "$EXPORT" = 1 ]; then
  python - "$W" <<'EOF'
import json, shutil, sys
from pathlib import Path
from tuwen.demo import DEMO_DIR
from tuwen.models.text2image import TextToImage
w = Path(sys.argv[1])
m = TextToImage.from_pretrained(w / "t2i").half()
m.config.sampling = m.config.sampling.replace(top_k=16, guidance_scale=2.0)  # generation defaults, chosen on val prompts
if DEMO_DIR.exists():
    shutil.rmtree(DEMO_DIR)
m.save_pretrained(DEMO_DIR)
meta = json.loads((w / "data" / "meta.json").read_text(encoding="utf-8"))
(DEMO_DIR / "demo.json").write_text(json.dumps({"holdout": meta["holdout"], "recipe": "scripts/train_demo.sh",
    "generation": {"top_k": 16, "guidance_scale": 2.0, "chosen_on": "val prompts (seen combinations)"}},
    indent=1) + "\n", encoding="utf-8")
print("exported to", DEMO_DIR)
EOF
fi
