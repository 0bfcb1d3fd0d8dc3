# verify on the tiny FP8 model against its own saved reference: old code (ea499e5, before teacher forcing) vs HEAD
set -e
# Run from the repository root: OLD=<a checkout of ea499e5> bash benchmarks/bench_verify_forcing_cost.sh
PY=${PY:-$(pwd)/.venv/bin/python}
NEW=$(pwd)
rm -rf /tmp/vt && mkdir -p /tmp/vt
$PY -m dsv3_tools synth /tmp/vt/ck --config tiny > /dev/null 2>&1
for side in old new; do
  dir=$NEW; [ $side = old ] && dir=$OLD
  cd $dir
  $PY -m dsv3_tools verify /tmp/vt/ck --save-reference /tmp/vt/ref-$side.safetensors --json > /dev/null 2>&1
  for i in 1 2 3; do
    /usr/bin/time -f "$side wall %e s maxrss %M KB" $PY -m dsv3_tools verify /tmp/vt/ck --reference /tmp/vt/ref-$side.safetensors --json > /dev/null
  done
  ls -l /tmp/vt/ref-$side.safetensors | awk '{print "'$side' reference bytes", $5}'
done
