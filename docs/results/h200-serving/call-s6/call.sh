#!/usr/bin/env bash
# Device call S6: vlmtune serve at 8 and 64 streaming clients (same image) with max_waiting_steps 0 (a prefill pass
# whenever a prompt waits, as in S3), 16 (the new default) and 32; then 64 clients with an image per request at 16.
export PYTHONUNBUFFERED=1
R=/tmp/res; mkdir -p $R; T0=$SECONDS
ts() { echo "[$((SECONDS - T0)) s] $*" | tee -a $R/timeline.txt; }
mkdir -p /tmp/app && tar xJf .gpu/app/vlmtune.tar.xz -C /tmp/app
export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
A=/tmp/app/gpu; V=$A/vlmtune; C=.gpu/cfg/internvl2-2b.json
$V bench make-model --config $C --tokenizer-from .gpu/tok --out /tmp/m2b --device cuda > $R/make-model.txt 2>&1
python3 -c "from PIL import Image; Image.open('.gpu/long/dog.jpg').convert('RGB').resize((1344,896)).save('/tmp/img7.jpg', quality=95)"
S="$A/VlmTune.Bench.Serve --model /tmp/m2b --device cuda --requests-per-client 3 --max-tokens 128 --image /tmp/img7.jpg"
sv() { timeout 70 $S --clients $2 ${@:3} > $R/serve-$1.txt 2>&1; grep -v "^fail\|^   at" $R/serve-$1.txt | tail -3 | cut -c1-230; }
for w in 0 16 32; do ts "same image, max waiting steps $w"; sv same-w$w 8,64 --max-waiting-steps $w; done
ts "image per request, 16"; sv distinct-w16 64 --distinct-images 1 --max-waiting-steps 16
ts done
(cd $R && tar cJf $OUT/res-s6.tar.xz .)
