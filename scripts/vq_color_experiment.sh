#!/usr/bin/env bash
# Issue 15: the recipe's stamps tokenizer for 600 steps with and without --color_weight (README "Training on your own images")
set -e
# run from the repository root with the venv active: bash scripts/vq_color_experiment.sh base 0 & bash scripts/vq_color_experiment.sh color4 4
# other tokenizers: ARCH="n_embed=4096 embed_dim=8 l2_norm=true" bash scripts/vq_color_experiment.sh codes4096 0
# augmentation: AUGMENT=flip,hue bash scripts/vq_color_experiment.sh aug 0
# extra caption-free training tables (before the validation table): EXTRA=runs/stamps/64/train.tsv,runs/clipart/64.tsv
export OMP_NUM_THREADS=1
ARM=$1; CW=$2; ARCH=${ARCH:-n_embed=1024 embed_dim=8 l2_norm=true}; AUGMENT=${AUGMENT:-none}; STEPS=${STEPS:-600}
W=runs/vqexp/$ARM
S=idx:str:1,text:str:1,imgbase64:str:1; D=runs/stamps/64
tuwen vq train --tables $D/train.tsv,${EXTRA:+$EXTRA,}$D/val.tsv --input_schema $S --second_sequence imgbase64 --checkpoint_dir $W --preset tiny --size 64 --arch $ARCH --micro_batch_size 16 --learning_rate 0.0004 --lr_schedule cosine --warmup_proportion 0.02 --max_steps $STEPS --augment $AUGMENT --l2_weight 1.0 --color_weight $CW --dead_code_steps 50 --disc_weight 0.1 --disc_start $((STEPS * 6 / 10)) --disc_num_layers 2 --perceptual_weight 0.0 --save_checkpoint_steps 300 --logging_steps 100 --no_progress > runs/vqexp/$ARM.log 2>&1
python scripts/vq_reconstruct.py --model $W --table $D/test.tsv --out runs/vqexp/${ARM}_recon_test.tsv > runs/vqexp/${ARM}_vq.json
tuwen evaluate-images --generated runs/vqexp/${ARM}_recon_test.tsv --reference $D/test.tsv --retrieval --output runs/vqexp/${ARM}_ret.json --no_progress > /dev/null
echo done $ARM
