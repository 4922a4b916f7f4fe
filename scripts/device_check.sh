#!/usr/bin/env bash
# One-shot speed check on a machine with one GPU (or, with --cpu, a < 60 s dry run on the
# CPU at tiny shapes). Writes flat JSON files under $OUT (default ./out/device_check):
#
#   env.json              nvidia-smi, package versions, JAX devices, measured copy
#                         bandwidth (read + write bytes of x + 1) and a bf16 matmul rate
#   decode_unrolled.json  scripts/bench.py --suite=decode, unrolled layers, against HF
#                         transformers generate in the same process; bandwidth floor from
#                         the copy bandwidth measured in env.json
#   decode_scan.json      the same with layers as lax.scan over stacked weights (rain_jax
#                         only: HF has no such switch)
#   rain_leaves1.json     scripts/bench.py --suite=rain, parallel_leaves=1 (reference)
#   rain_leaves4.json     the same with parallel_leaves=4
#   summary.json          the headline numbers of all of the above, also printed as a table
#
# Every step runs under its own `timeout`; a step that fails or runs out of time still
# writes its file, with exit_code, timed_out, the end of its stderr as `error`, and the
# rows it finished (bench.py logs each finished batch row as a `row {json}` line).
# Random weights throughout: the judge means nothing, these are speed numbers.
#
#   OUT=/tmp/dc bash scripts/device_check.sh          # GPU: LLaMA-7B shapes, bf16, < 8 min
#   OUT=/tmp/dc bash scripts/device_check.sh --cpu    # dry run: tiny shapes, CPU, < 60 s
#
# Runs from a checkout with nothing installed: PYTHONPATH is set to the repository root.
# Needs python3 with jax, flax, numpy, torch, transformers, sentencepiece.
set -euo pipefail

MODE=gpu
for arg in "$@"; do
  case "$arg" in
    --cpu) MODE=cpu ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "device_check: unknown argument $arg (expected --cpu)" >&2; exit 2 ;;
  esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-$REPO/out/device_check}"
mkdir -p "$OUT"
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
PY="${PYTHON:-python3}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and torch share the GPU
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
export DEVICE_CHECK_MODE="$MODE"
T0=$(date +%s)

if [[ "$MODE" == cpu ]]; then
  export JAX_PLATFORMS=cpu
  export OMP_WAIT_POLICY=PASSIVE  # torch's spinning threads starve JAX on a shared CPU
  # Compile time dominates at tiny shapes (RAIN: 20-40 s a program at the default level).
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  PARALLEL=1  # all four bench steps at once (see below)
  # Step limits (seconds) and shapes: tiny, so the whole run fits in a minute.
  LIMIT_ENV=60; LIMIT_UNROLLED=150; LIMIT_SCAN=150; LIMIT_RAIN=150
  DECODE=(--preset=tiny-gqa --dtype=float32 --batch_sizes=1,2 --prompt_len=8
          --new_tokens=4 --repeats=1)
  # The LLaMA tokenizer (32000 ids) and HH prompts need a wider vocabulary and context.
  RAIN=(--preset=tiny-gqa --preset_override=vocab_size=32000,max_seq_len=2048
        --dtype=float32 --batch_sizes=1 --scan_layers=true --rain_new_tokens=3
        --rain_max_T=15 --rain_max_rollout=4 --rain_runs=1 --rain_vanilla=true
        --rain_count_calls=false)
  FALLBACK_BANDWIDTH_GBS=10
else
  # Sum of the limits: 465 s; the device call should allow ~500 s. Seen on an H200
  # (docs/bench/device_check_h200_20261204): unrolled random init ~80 s, HF copy 12 s,
  # ~25 s a batch size; RAIN compile 30 s (1 leaf) to 50 s (4 leaves) a batch size.
  LIMIT_ENV=35; LIMIT_UNROLLED=175; LIMIT_SCAN=65; LIMIT_RAIN=95
  DECODE=(--preset=llama-7b --dtype=bfloat16 --batch_sizes=1,16 --prompt_len=128
          --new_tokens=32 --repeats=2)
  # Scanned layers: one layer body to compile per model call site (RAIN has several);
  # unrolled 7B layers would not compile in these limits. Steady state: the runner
  # times the first call's execution apart from its lower + compile (--rain_runs=1).
  RAIN=(--preset=llama-7b --dtype=bfloat16 --batch_sizes=1,8,32 --scan_layers=true
        --rain_new_tokens=3 --rain_max_T=15 --rain_max_rollout=16 --rain_runs=1
        --rain_vanilla=false --rain_count_calls=false)
  FALLBACK_BANDWIDTH_GBS=4300  # device-to-device copy measured on an H200 here (KINDS.md)
  PARALLEL=0
fi

say() { echo "device_check: [$(( $(date +%s) - T0 )) s] $*" >&2; }

# step NAME LIMIT_S COMMAND...: runs COMMAND under timeout, stdout to $SCRATCH/NAME.stdout,
# stderr to the terminal and $SCRATCH/NAME.stderr, then writes $OUT/NAME.json.
step() {
  local name="$1" limit="$2"; shift 2
  say "step $name (limit ${limit} s): $*"
  local start rc
  start=$(date +%s.%N)
  set +e
  { timeout --kill-after=5 "$limit" "$@" 2>&1 >"$SCRATCH/$name.stdout"; \
    echo $? >"$SCRATCH/$name.rc"; } | tee "$SCRATCH/$name.stderr" >&2
  set -e
  rc=$(cat "$SCRATCH/$name.rc")
  STEP_NAME="$name" STEP_LIMIT="$limit" STEP_RC="$rc" STEP_START="$start" \
  STEP_SCRATCH="$SCRATCH" STEP_OUT="$OUT" "$PY" - "$@" <<'PYEOF' || say "could not write $name.json"
import json, os, sys, time
name, scratch = os.environ['STEP_NAME'], os.environ['STEP_SCRATCH']
rc = int(os.environ['STEP_RC'])
read = lambda ext: open(os.path.join(scratch, f'{name}.{ext}'), errors='replace').read()
stdout, stderr = read('stdout'), read('stderr')
report, parse_error = None, None
try:
  report = json.loads(stdout) if stdout.strip() else None
except ValueError as e:
  parse_error = f'stdout is not one JSON object: {e}'
rows = []
for line in stderr.splitlines():
  _, sep, rest = line.partition(' row {')
  if sep:
    try:
      rows.append(json.loads('{' + rest))
    except ValueError:
      pass
ok = rc == 0 and report is not None
result = {
    'step': name, 'command': sys.argv[1:], 'ok': ok, 'exit_code': rc,
    'timed_out': rc in (124, 137), 'limit_s': float(os.environ['STEP_LIMIT']),
    'wall_s': time.time() - float(os.environ['STEP_START']),
    'error': None if ok else (parse_error or '\n'.join(stderr.splitlines()[-40:])),
    'rows_logged': rows, 'report': report,
}
with open(os.path.join(os.environ['STEP_OUT'], f'{name}.json'), 'w') as f:
  json.dump(result, f, indent=1)
print(f'device_check: {name}: ok={ok} exit={rc} wall={result["wall_s"]:.1f} s '
      f'rows={len(rows)}', file=sys.stderr)
PYEOF
}

say "mode $MODE, OUT=$OUT, repo $REPO"

# 1. Environment, copy bandwidth and matmul rate.
step env "$LIMIT_ENV" "$PY" - <<'PYEOF'
import importlib, importlib.metadata, json, os, platform, statistics, subprocess, sys, time
gpu = os.environ.get('DEVICE_CHECK_MODE') == 'gpu'
info = {'mode': os.environ.get('DEVICE_CHECK_MODE'), 'python': platform.python_version(),
        'platform': platform.platform(), 'cpu_count': os.cpu_count(),
        'load_average': list(os.getloadavg()), 'utc': time.strftime('%Y-%m-%dT%H:%M:%SZ',
                                                                   time.gmtime())}
try:
  smi = subprocess.run(['nvidia-smi', '--query-gpu=name,memory.total,memory.used,'
                        'driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw',
                        '--format=csv,noheader'], capture_output=True, text=True, timeout=20)
  info['nvidia_smi'] = (smi.stdout or smi.stderr).strip()
except (OSError, subprocess.SubprocessError) as e:
  info['nvidia_smi'] = f'unavailable: {e}'
versions = {}
for pkg in ('jax', 'jaxlib', 'jax-cuda13-plugin', 'jax-cuda12-plugin', 'flax', 'numpy',
            'torch', 'transformers', 'tokenizers', 'sentencepiece', 'safetensors',
            'orbax-checkpoint', 'absl-py', 'tqdm', 'vaderSentiment', 'gguf', 'sacrebleu'):
  try:
    versions[pkg] = importlib.metadata.version(pkg)
  except importlib.metadata.PackageNotFoundError:
    versions[pkg] = None
info['versions'] = versions
# Our modules the benches import, from the checkout (nothing of ours is installed).
imports = {}
for mod in ('models.llama', 'models.presets', 'models.tokenizer', 'rain_jax.generate',
            'rain_jax.engine', 'rain_jax.search', 'rain_jax.tasks', 'scripts.bench'):
  try:
    importlib.import_module(mod)
    imports[mod] = 'ok'
  except Exception as e:  # pylint: disable=broad-except
    imports[mod] = f'{type(e).__name__}: {e}'
info['project_imports'] = imports
import jax, jax.numpy as jnp
info['jax_backend'] = jax.default_backend()
info['jax_devices'] = [f'{d.platform}:{d.id} {d.device_kind}' for d in jax.devices()]
try:
  import torch
  info['torch_cuda'] = torch.cuda.is_available()
  info['torch_device'] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
except Exception as e:  # pylint: disable=broad-except
  info['torch_cuda'] = f'{type(e).__name__}: {e}'

def median_seconds(fn, *args, repeats=10):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)

# Copy bandwidth: y = x + 1 reads and writes every byte once (bf16, random data).
n = (1 << 31) if gpu else (1 << 24)  # 4 GiB on the GPU, 32 MiB here
x = jax.random.normal(jax.random.PRNGKey(0), (n,), jnp.bfloat16)
seconds = median_seconds(jax.jit(lambda v: v + 1), x)
info['copy_bandwidth'] = {'array_bytes': 2 * n, 'bytes_moved': 4 * n,
                          'median_s': seconds, 'gb_per_s': 4 * n / seconds / 1e9,
                          'how': 'jit(x + 1) on bf16, read + write bytes / median of 10'}
del x
# Matmul rate: bf16 [m, m] @ [m, m] on random data.
m = 8192 if gpu else 512
a = jax.random.normal(jax.random.PRNGKey(1), (m, m), jnp.bfloat16)
b = jax.random.normal(jax.random.PRNGKey(2), (m, m), jnp.bfloat16)
seconds = median_seconds(jax.jit(jnp.matmul), a, b)
info['matmul_bf16'] = {'m': m, 'median_s': seconds, 'tflop_per_s': 2 * m**3 / seconds / 1e12}
print(json.dumps(info, indent=1))
PYEOF

BANDWIDTH_GBS=$("$PY" -c '
import json, sys
try:
  print(round(json.load(open(sys.argv[1]))["report"]["copy_bandwidth"]["gb_per_s"], 1))
except Exception:
  print(sys.argv[2])' "$OUT/env.json" "$FALLBACK_BANDWIDTH_GBS")
say "bandwidth for the floor: $BANDWIDTH_GBS GB/s"

# 2. Decode: unrolled layers against HF generate, then scanned layers (rain_jax only).
# With PARALLEL=1 (--cpu) the four bench steps run side by side: on a small CPU the RAIN
# compiles (single-threaded) dominate; the speed numbers of a dry run mean nothing.
pair() { if [[ "$PARALLEL" == 1 ]]; then "$@" & else "$@"; fi; }
pair step decode_unrolled "$LIMIT_UNROLLED" "$PY" scripts/bench.py --suite=decode \
  "${DECODE[@]}" --scan_layers=false --peak_bandwidth_gbs="$BANDWIDTH_GBS"
pair step decode_scan "$LIMIT_SCAN" "$PY" scripts/bench.py --suite=decode "${DECODE[@]}" \
  --scan_layers=true --skip_hf --peak_bandwidth_gbs="$BANDWIDTH_GBS"

# 3. RAIN at parallel leaves 1 and 4.
for leaves in 1 4; do
  pair step "rain_leaves$leaves" "$LIMIT_RAIN" "$PY" scripts/bench.py --suite=rain \
    "${RAIN[@]}" --rain_parallel_leaves="$leaves"
done
wait

# 4. Summary: the headline numbers, as JSON and as a table.
OUT="$OUT" "$PY" - <<'PYEOF'
import json, os
out = os.environ['OUT']
def load(name):
  try:
    with open(os.path.join(out, f'{name}.json')) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None
def rows(step):
  if step is None:
    return []
  return (step['report'] or {}).get('results') or step['rows_logged']
summary = {'steps': {}, 'decode': [], 'rain': []}
env = load('env')
for name in ('env', 'decode_unrolled', 'decode_scan', 'rain_leaves1', 'rain_leaves4'):
  s = load(name)
  summary['steps'][name] = None if s is None else {
      k: s[k] for k in ('ok', 'exit_code', 'timed_out', 'wall_s', 'limit_s')}
if env and env['report']:
  r = env['report']
  summary['env'] = {'nvidia_smi': r.get('nvidia_smi'), 'jax_devices': r.get('jax_devices'),
                    'copy_gb_per_s': r['copy_bandwidth']['gb_per_s'],
                    'matmul_bf16_tflop_per_s': r['matmul_bf16']['tflop_per_s'],
                    'versions': {k: r['versions'].get(k) for k in
                                 ('jax', 'jaxlib', 'flax', 'torch', 'transformers')}}
for name in ('decode_unrolled', 'decode_scan'):
  for row in rows(load(name)):
    for side in ('rain_jax', 'hf'):
      if side not in row:
        continue
      r = row[side]
      bw = row.get('bandwidth', {}).get(side, {})
      summary['decode'].append({
          'run': name, 'side': side, 'batch': row['batch_size'],
          'decode_tok_s': r['decode_tokens_per_s'], 'ms_per_step': r['decode_ms_per_step'],
          'prefill_tok_s': r['prefill_tokens_per_s'],
          'compile_s': (r['prefill_compile_s'] + r['generate_compile_s']
                        if side == 'rain_jax' else None),
          'floor_ms': bw.get('floor_ms_per_step'), 'of_floor': bw.get('fraction_of_floor'),
          'decode_ratio_vs_hf': row.get('ratio_rain_jax_over_hf', {}).get(
              'decode_tokens_per_s') if side == 'rain_jax' else None})
for name in ('rain_leaves1', 'rain_leaves4'):
  for row in rows(load(name)):
    r = row['rain']
    summary['rain'].append({
        'leaves': row.get('parallel_leaves'), 'batch': row['batch_size'],
        's_per_sim': r['seconds_per_simulation'],
        's_per_commit': r.get('seconds_per_committed_set'), 'batch_s': r['batch_seconds'],
        'sims_per_prompt': r['simulations_per_prompt'],
        'passes_per_sim': r.get('forward_passes_per_simulation'),
        'compile_s': r['compile_seconds'],
        'prompts_per_s': row['throughput_prompts_per_second']['rain']})
with open(os.path.join(out, 'summary.json'), 'w') as f:
  json.dump(summary, f, indent=1)
fmt = lambda v: '-' if v is None else (f'{v:.4g}' if isinstance(v, float) else str(v))
print('\n== device_check summary ==')
print('steps: ' + ', '.join(f'{k}={"ok" if v and v["ok"] else ("timeout" if v and v["timed_out"] else "FAILED")}'
                            f'({v["wall_s"]:.0f}s)' if v else f'{k}=missing'
                            for k, v in summary['steps'].items()))
if 'env' in summary:
  e = summary['env']
  print(f"env: {e['nvidia_smi']} | copy {e['copy_gb_per_s']:.0f} GB/s | "
        f"matmul {e['matmul_bf16_tflop_per_s']:.0f} TFLOP/s | {e['versions']}")
for table in ('decode', 'rain'):
  if summary[table]:
    keys = list(summary[table][0])
    print(' | '.join(keys))
    for row in summary[table]:
      print(' | '.join(fmt(row[k]) for k in keys))
PYEOF
say "done; files: $(cd "$OUT" && ls | tr '\n' ' ')"
