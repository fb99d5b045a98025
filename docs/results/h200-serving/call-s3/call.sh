#!/usr/bin/env bash
# Device call S3: libtorch's cuDNN attention (plan built per new shape) against flash / memory-efficient first
# (VLMTUNE_CUDNN_ATTENTION=0, the new default): vlmtune serve (same image, an image per request), bench train and the
# real trainer on CLoT-like data beside the eager reference; then InternVL3.5-2B with its untied head.
export PYTHONUNBUFFERED=1
R=/tmp/res; mkdir -p $R; T0=$SECONDS
left() { [ $((SECONDS - T0)) -lt $1 ]; }
ts() { echo "[$((SECONDS - T0)) s] $*" | tee -a $R/timeline.txt; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $R/gpu.txt
mkdir -p /tmp/app && tar xJf .gpu/app/vlmtune.tar.xz -C /tmp/app
export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
python3 -c 'import torch;print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version())' >> $R/gpu.txt
A=/tmp/app/gpu; V=$A/vlmtune; C=.gpu/cfg/internvl2-2b.json; IVL=.gpu/goldens/internvl_chat
$V bench make-model --config $C --tokenizer-from .gpu/tok --out /tmp/m2b --device cuda > $R/make-model.txt 2>&1
python3 -c "from PIL import Image; Image.open('.gpu/long/dog.jpg').convert('RGB').resize((1344,896)).save('/tmp/img7.jpg', quality=95)"
S="$A/VlmTune.Bench.Serve --model /tmp/m2b --device cuda --requests-per-client 3 --max-tokens 128 --image /tmp/img7.jpg"
sv() { timeout 150 env VLMTUNE_CUDNN_ATTENTION=$2 $S --clients $3 ${@:4} > $R/serve-$1.txt 2>&1; grep -v "^fail\|^   at" $R/serve-$1.txt | tail -5 | cut -c1-230; }
ts serve-same default; sv same-image 0 1,8,32,64
ts serve-same cudnn; sv same-image-cudnn 1 1,8,64
ts serve-distinct default; sv distinct-images 0 1,8,32,64 --distinct-images 1
export PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync
b() { timeout 100 env VLMTUNE_CUDNN_ATTENTION=$1 $V bench train --device cuda ${@:2} 2>>$R/bench-train.err | tee -a $R/bench-train.jsonl | cut -c1-300; }
ts bench-train; b 0 --config $C --mode lora --workload clot; b 1 --config $C --mode lora --workload clot
t() { timeout 100 env $1 $V train .gpu/clot/lora.yaml --set max_steps=30 ${@:3} > $R/train-$2.log 2>&1; echo "train $2 rc=$?"; grep -E "Iter\(train\)" $R/train-$2.log | tail -2 | sed -E 's/  eta: [^ ]+//' | cut -c1-240; }
ts train; t VLMTUNE_CUDNN_ATTENTION=0 flash; t VLMTUNE_CUDNN_ATTENTION=1 cudnn; t VLMTUNE_CUDNN_ATTENTION=0 flash-pad1 --set pad_to_multiple_of=1
ts ref; timeout 100 python3 .gpu/tools/perf_ref.py $IVL $C 8 1 380 > $R/ref-clot.txt 2>&1; grep train_lora $R/ref-clot.txt
left 420 && { ts ref-tuned; timeout 110 python3 .gpu/tools/perf_ref_tuned.py $IVL $C 8 1 380 > $R/ref-tuned-clot.txt 2>&1; grep train_lora $R/ref-tuned-clot.txt; }
C35=.gpu/cfg/internvl3_5-2b.json
left 470 && { ts internvl3.5-untied; timeout 60 $V bench decode --config $C35 --device cuda --batch 1 8 32 64 > $R/decode-internvl3_5-2b-untied.jsonl 2>&1; cut -c1-200 $R/decode-internvl3_5-2b-untied.jsonl | grep decode_step; }
left 520 && b 0 --config $C35 --mode lora
ts done
(cd $R && tar cJf $OUT/res-s3.tar.xz .)
