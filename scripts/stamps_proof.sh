#!/usr/bin/env bash
# Issue 15's proof on the tuxpaint stamps set (scripts/make_stamps_set.py → runs/stamps): the `tuwen recipe`
# settings ("new") against the old demo recipe of scripts/train_demo.sh ("old": tiny VQGAN preset, GPT without
# dropout/weight decay, text_len 32, sampling top_k 100 without guidance, captioner loss over all text_len
# positions), both at the same (scaled-down) budget on CPU, then the measurements.
#
#   bash scripts/stamps_proof.sh new|old [vq cap codes t2i gen capeval measure]   # default: all stages in order
#
# Env: W (runs/q2), D (runs/stamps/64), VQ_STEPS (new: batch 16; old: half as many steps of 32), GPT_STEPS (new:
# batch 32; old: half as many of 64), CAP_STEPS (batch 32, both). A stage whose output exists is skipped.
set -euo pipefail
ARM=$1; shift
STAGES=${*:-vq cap codes t2i gen capeval measure}
W=${W:-runs/q2}/$ARM
D=${D:-runs/stamps/64}
VQ_STEPS=${VQ_STEPS:-240}
GPT_STEPS=${GPT_STEPS:-300}
CAP_STEPS=${CAP_STEPS:-300}
S=idx:str:1,text:str:1,imgbase64:str:1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$W"
t() { local s=$SECONDS; "$@"; echo "[$ARM] $(( SECONDS - s )) s: ${*:1:4}" | tee -a "$W/times.txt"; }

for st in $STAGES; do case $st in
vq)
  [ -f "$W/vqgan/model.safetensors" ] && continue
  if [ "$ARM" = new ]; then   # tuwen recipe: f8, 1024 × 8-d l2-normalised codes, dead-code restarts, PatchGAN at 60 %
    t tuwen vq train --tables "$D/train.tsv,$D/val.tsv" --input_schema $S --second_sequence imgbase64 \
      --checkpoint_dir "$W/vqgan" --preset tiny --size 64 --arch n_embed=1024 embed_dim=8 l2_norm=true \
      --micro_batch_size 16 --learning_rate 0.0004 --lr_schedule cosine --warmup_proportion 0.02 \
      --max_steps "$VQ_STEPS" --l2_weight 1.0 --dead_code_steps 50 --disc_weight 0.1 \
      --disc_start $(( VQ_STEPS * 6 / 10 )) --disc_num_layers 2 --perceptual_weight 0.0 \
      --save_checkpoint_steps $(( VQ_STEPS / 2 )) --logging_steps 20 --no_progress
  else                        # train_demo.sh stage 1: tiny preset (512 × 256-d codes), L1 + 2·L2, no discriminator
    t tuwen vq train --tables "$D/train.tsv,$D/val.tsv" --input_schema $S --second_sequence imgbase64 \
      --checkpoint_dir "$W/vqgan" --preset tiny --size 64 --micro_batch_size 32 --learning_rate 1e-3 \
      --lr_schedule cosine --max_steps $(( VQ_STEPS / 2 )) --l2_weight 2 --dead_code_steps 50 --logging_steps 10 \
      --save_checkpoint_steps $(( VQ_STEPS / 4 )) --no_progress
  fi ;;
cap)
  [ -f "$W/cap/model.safetensors" ] && continue
  C=(tuwen --mode=train --app_name=image2text_generation --tables="$D/train.tsv,$D/val.tsv" --input_schema=$S
     --first_sequence=imgbase64 --second_sequence=text --learning_rate=1e-3 --micro_batch_size=32
     --max_steps="$CAP_STEPS" --logging_steps=20 --no_progress --checkpoint_dir="$W/cap"
     --save_checkpoint_steps=$(( CAP_STEPS / 2 )))
  if [ "$ARM" = new ]; then   # loss over the caption and its end token (the default), dropout, wd, cosine
    t "${C[@]}" --weight_decay=0.05 --lr_schedule=cosine \
      --user_defined_parameters='img_size=64 text_len=24 vit_preset=small n_layer=4 n_head=4 n_embd=128 dropout=0.1'
  else                        # README's synthetic-caption recipe with EasyNLP's loss over all text_len positions
    t "${C[@]}" \
      --user_defined_parameters='img_size=64 text_len=32 n_layer=4 n_head=4 n_embd=128 vit_preset=small loss_on_padding=true'
  fi ;;
codes)
  for s in train val; do
    [ -f "$W/codes_$s/meta.json" ] || t tuwen vq tokenize --model "$W/vqgan" --tables "$D/$s.tsv" \
      --input_schema $S --first_sequence text --second_sequence imgbase64 --out "$W/codes_$s"
  done ;;
t2i)
  [ -f "$W/t2i/model.safetensors" ] && continue
  if [ "$ARM" = new ]; then
    t tuwen --mode=train --app_name=text2image_generation --tables="$W/codes_train,$W/codes_val" \
      --checkpoint_dir="$W/t2i" --learning_rate=0.001 --weight_decay=0.1 --lr_schedule=cosine \
      --warmup_proportion=0.05 --max_steps="$GPT_STEPS" --micro_batch_size=32 \
      --save_checkpoint_steps=$(( GPT_STEPS / 2 )) --logging_steps=20 --no_progress \
      --user_defined_parameters="vqgan_ckpt_path=$W/vqgan size=64 text_len=24 n_layer=4 n_head=4 n_embd=256 dropout=0.1 cfg_drop_prob=0.1"
  else
    t tuwen --mode=train --app_name=text2image_generation --tables="$W/codes_train,$W/codes_val" \
      --input_schema=$S --first_sequence=text --second_sequence=imgbase64 --checkpoint_dir="$W/t2i" \
      --learning_rate=1e-3 --max_steps=$(( GPT_STEPS / 2 )) --random_seed=42 --logging_steps=10 \
      --save_checkpoint_steps=$(( GPT_STEPS / 4 )) --micro_batch_size=64 --lr_schedule cosine --no_progress \
      --user_defined_parameters="size=64 text_len=32 img_len=64 img_vocab_size=512 vqgan_ckpt_path=$W/vqgan n_layer=4 n_head=4 n_embd=256 dropout=0.0 cfg_drop_prob=0.1"
  fi ;;
gen)
  [ -f "$W/gen_train.tsv" ] && continue
  # one image per training prompt: new = the defaults saved with the model (top_k 16, guidance 2.0);
  # old = what the old model saved (EasyNLP's top_k 100, no guidance)
  SAMP=""; [ "$ARM" = old ] && SAMP="--user_defined_parameters=top_k=100 guidance_scale=1.0"
  # the last training step (as for the captioner): the training prompts are the test here
  [ -f "$W/t2i_last/model.safetensors" ] || tuwen export "$W/t2i" "$W/t2i_last"
  t tuwen --mode=predict --app_name=text2image_generation --tables="$D/train.tsv" --input_schema=$S \
    --first_sequence=text --outputs="$W/gen_train.tsv" --output_schema=idx,text,gen_imgbase64 \
    --checkpoint_dir="$W/t2i_last" --micro_batch_size=32 --random_seed=0 --no_progress ${SAMP:+"$SAMP"}
  python - "$W/gen_train.tsv" "$W/grid_gen_train.png" "$D/train.tsv" <<'EOF'
import json, sys
from tuwen.data.images import make_grid, open_image
gen = [l.rstrip("\n").split("\t") for l in open(sys.argv[1], encoding="utf-8")][:32]
ref = {l.split("\t")[0]: l.rstrip("\n").split("\t")[2] for l in open(sys.argv[3], encoding="utf-8")}
ims = []
for idx, _, g in gen:   # pairs: reference | generated
    g = json.loads(g)[0] if g.startswith("[") else g
    ims += [open_image(ref[idx]).convert("RGB"), open_image(g).convert("RGB")]
make_grid(ims, cols=16).save(sys.argv[2])
print("grid (reference | generated, 32 training prompts):", sys.argv[2])
EOF
  ;;
capeval)
  # the last training step, not the best-by-validation folder: the val folders are other kinds of things, so the
  # val loss stops improving early, while naming the training images needs the whole run
  [ -f "$W/cap_last/model.safetensors" ] || tuwen export "$W/cap" "$W/cap_last"
  for s in train test; do
    [ -f "$W/cap_$s.tsv" ] || t tuwen --mode=predict --app_name=image2text_generation --tables="$D/$s.tsv" \
      --input_schema=$S --first_sequence=imgbase64 --outputs="$W/cap_$s.tsv" --output_schema=idx,gen_text \
      --checkpoint_dir="$W/cap_last" --micro_batch_size=64 --no_progress
  done
  [ -f "$W/cap_eval_test.json" ] || t tuwen --mode=evaluate --app_name=image2text_generation --tables="$D/test.tsv" \
    --input_schema=$S --first_sequence=imgbase64 --second_sequence=text --checkpoint_dir="$W/cap_last" \
    --outputs="$W/cap_eval_test.json" --no_progress ;;
measure)
  python scripts/vq_reconstruct.py --model "$W/vqgan" --table "$D/test.tsv" --out "$W/recon_test.tsv" \
    | tee "$W/vq_test.json"
  tuwen evaluate-images --generated "$W/recon_test.tsv" --reference "$D/test.tsv" --retrieval \
    --output "$W/recon_retrieval_test.json" --no_progress > /dev/null
  tuwen evaluate-images --generated "$W/gen_train.tsv" --reference "$D/train.tsv" --retrieval \
    --output "$W/retrieval_train.json" --no_progress > /dev/null
  tuwen evaluate-images --generated "$W/gen_train.tsv" --reference "$D/train.tsv" --features random:0 \
    --output "$W/fd_train.json" --no_progress > /dev/null
  if [ ! -f "${W%/*}/fd_floor.json" ]; then   # the floor: one half of the references against the other
    awk 'NR % 2 == 1' "$D/train.tsv" > "${W%/*}/train_half_a.tsv"
    awk 'NR % 2 == 0' "$D/train.tsv" > "${W%/*}/train_half_b.tsv"
    tuwen evaluate-images --generated "${W%/*}/train_half_a.tsv" --reference "${W%/*}/train_half_b.tsv" \
      --features random:0 --output "${W%/*}/fd_floor.json" --no_progress > /dev/null
  fi
  python - "$D" "$W" <<'EOF'
import json, sys
d, w = sys.argv[1:]
def exact(split):
    ref = {l.split("\t")[0]: l.split("\t")[1] for l in open(f"{d}/{split}.tsv", encoding="utf-8")}
    rows = [l.rstrip("\n").split("\t") for l in open(f"{w}/cap_{split}.tsv", encoding="utf-8")]
    norm = lambda s: "".join(s.split())   # the tokenizer's decode may space out CJK characters
    return sum(norm(g) == norm(ref[i]) for i, g in rows) / len(rows), len({norm(g) for _, g in rows})
vq = json.load(open(f"{w}/vq_test.json"))
rr = json.load(open(f"{w}/recon_retrieval_test.json"))["retrieval"]
gr = json.load(open(f"{w}/retrieval_train.json"))["retrieval"]
fd = json.load(open(f"{w}/fd_train.json"))
floor = json.load(open(f"{w.rsplit('/', 1)[0]}/fd_floor.json"))
ev = json.load(open(f"{w}/cap_eval_test.json"))
ex_tr, distinct_tr = exact("train")
ex_te, _ = exact("test")
out = {"vq_test_psnr": vq["psnr"], "vq_test_usage": vq["usage"], "vq_test_codes_used": vq["codes_used"],
       "recon_R@1_pixel": rr["pixel"]["R@1"], "recon_R@1_random": rr["random_features"]["R@1"],
       "gen_train_R@1_pixel": gr["pixel"]["R@1"], "gen_train_R@1_random": gr["random_features"]["R@1"],
       "gen_chance@1": gr["pixel"]["chance@1"], "fd_random": fd.get("fd"), "fd_floor_halves": floor.get("fd"),
       "cap_exact_train": ex_tr, "cap_distinct_train": distinct_tr, "cap_exact_test": ex_te, "cap_eval_test": ev}
print(json.dumps(out, ensure_ascii=False, indent=1))
json.dump(out, open(f"{w}/summary.json", "w"), ensure_ascii=False, indent=1)
EOF
  ;;
*) echo "unknown stage $st" >&2; exit 2 ;;
esac; done
