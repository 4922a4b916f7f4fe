"""Decode benchmark: rain_jax against HF transformers on the same weights and prompts.

  python3 scripts/bench.py --suite=decode                      # SmolLM2-135M, this CPU
  python3 scripts/bench.py --suite=decode --preset=llama-7b --dtype=bfloat16   # GPU
  python3 scripts/bench.py --suite=rain                        # RAIN vs vanilla (bench_rain.py)

Prints ONE JSON object to stdout; logs go to stderr. For each batch size it times, on
the same prompts ([B, prompt_len] random token ids) and the same weights (HF's
`LlamaForCausalLM` gets a copy of rain_jax's parameters):

- rain_jax: prefill = `rain_jax.kvcache.prefill` into an empty cache of the size
  `rain_jax.generate.generate` uses; generate = `generate.generate` (greedy, one jitted
  `lax.while_loop`, EOS and stop sequences disabled so every row makes new_tokens tokens).
- HF: prefill = one forward over the prompt with a KV cache and `logits_to_keep=1`
  (the prefill `generate` runs); generate = `model.generate` greedy with its KV cache and
  `min_new_tokens = max_new_tokens = new_tokens`.

Each is called once to warm up (for rain_jax the compile time is measured apart, from
`.lower().compile()`), then `repeats` times; the report gives medians. Over all B rows:
prefill tokens/s = B * prompt_len / prefill; decode tokens/s = B * new_tokens /
(generate - prefill); ms per decode step = (generate - prefill) / (new_tokens - 1), since
generating new_tokens tokens takes one prefill and new_tokens - 1 one-token passes.

`--model` (a registry name) loads real weights; `--preset` builds random weights at a
preset's shapes (no download). On a GPU backend HF runs on cuda and the report adds, at
batch 1 (at every batch size, and on any backend, when `--peak_bandwidth_gbs` is given),
the fraction of the memory-bandwidth floor reached: bytes of weights read per decode
step / measured step time / `--peak_bandwidth_gbs`. Each finished batch row is also
logged to stderr as one `row {json}` line (scripts/device_check.sh recovers the rows of a
run cut short from them).
"""
import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time

# JAX and torch share one accelerator here: let JAX allocate on demand instead of taking
# most of the device memory up front.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from models import llama, presets, registry  # pylint: disable=wrong-import-position
from rain_jax import extras, generate, kvcache, loading, stopping  # pylint: disable=wrong-import-position

SUITES = ('decode', 'rain')
DTYPES = ('float32', 'bfloat16')
PROMPT_SEED = 0
# Environment variables that change how either framework uses the cores; reported as set.
THREADING_ENV = ('OMP_NUM_THREADS', 'OMP_WAIT_POLICY', 'MKL_NUM_THREADS', 'XLA_FLAGS')
FIRST_PROMPT_TOKEN = 3  # ids below are control tokens in the LLaMA and SmolLM2 vocabularies


_START = time.perf_counter()


def log(message):
  """Writes message to stderr with the seconds since the script started."""
  print(f'bench: [{time.perf_counter() - _START:.1f} s] {message}', file=sys.stderr, flush=True)


def parse_bool(text):
  """'true'/'false' (also 1/0, yes/no) -> bool; argparse.ArgumentTypeError otherwise."""
  value = text.strip().lower()
  if value in ('true', '1', 'yes'):
    return True
  if value in ('false', '0', 'no'):
    return False
  raise argparse.ArgumentTypeError(f'expected true or false, got {text!r}')


def parse_batch_sizes(text):
  """'1,16' -> [1, 16]; each must be a positive integer."""
  try:
    sizes = [int(part) for part in text.split(',') if part.strip()]
  except ValueError as e:
    raise argparse.ArgumentTypeError(f'--batch_sizes must be integers, got {text!r}') from e
  if not sizes or min(sizes) < 1:
    raise argparse.ArgumentTypeError(f'--batch_sizes must be positive integers, got {text!r}')
  return sizes


def parse_overrides(text):
  """'vocab_size=32000,max_seq_len=2048' -> {'vocab_size': 32000, 'max_seq_len': 2048}."""
  overrides = {}
  for part in text.split(','):
    if not part.strip():
      continue
    key, sep, value = part.partition('=')
    if not sep or not key.strip():
      raise argparse.ArgumentTypeError(f'expected key=value pairs, got {text!r}')
    for convert in (int, float):
      try:
        overrides[key.strip()] = convert(value)
        break
      except ValueError:
        pass
    else:
      overrides[key.strip()] = value.strip()
  return overrides


def build_parser():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--suite', choices=SUITES, required=True)
  parser.add_argument('--model', default=None,
                      help='registry name with weights (default smollm2-135m-instruct)')
  parser.add_argument('--preset', default=None,
                      help='preset name: random weights at its shapes (excludes --model)')
  parser.add_argument('--preset_override', type=parse_overrides, default={},
                      help='with --preset: config fields to change, e.g. '
                           'vocab_size=32000,max_seq_len=2048 (tiny shapes that hold the '
                           'LLaMA tokenizer and HH prompts, for the rain suite)')
  parser.add_argument('--dtype', choices=DTYPES, default='float32',
                      help='parameter and compute dtype, both frameworks')
  parser.add_argument('--prompt_len', type=int, default=256)
  parser.add_argument('--new_tokens', type=int, default=64)
  parser.add_argument('--batch_sizes', type=parse_batch_sizes, default=None,
                      help='default: 1,16 (decode), 1,8 (rain)')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--scan_layers', type=parse_bool, default=None,
                      help='scan over stacked layers (default: true on CPU, false on GPU)')
  parser.add_argument('--skip_hf', action='store_true', help='time rain_jax only')
  parser.add_argument('--peak_bandwidth_gbs', type=float, default=None,
                      help='device memory bandwidth in GB/s for the floor; reported on '
                           'any backend when given, on GPU with 3000 when not')
  parser.add_argument('--rain_max_T', type=int, default=50,
                      help='rain: simulations per committed set (early stop disabled; '
                           'the reference HH max_T)')
  parser.add_argument('--rain_new_tokens', type=int, default=32,
                      help='rain: new tokens per answer (32: the tree reaches 10-token sets)')
  parser.add_argument('--rain_max_rollout', type=int, default=64,
                      help='rain: rollout length cap (the CLI\'s --max_rollout default)')
  parser.add_argument('--rain_similarity', default='mean_hidden',
                      choices=('minilm', 'mean_hidden', 'none'),
                      help='rain: similarity (the CLI default minilm needs the MiniLM '
                           'wheel; mean_hidden runs anywhere)')
  parser.add_argument('--rain_call_ms', type=float, default=None,
                      help='rain: ms of one decode call of a LLaMA-7B-shaped model on the '
                           'accelerator the projection is for (default: H200, measured '
                           'by scripts/device_check.sh, 11.315 ms)')
  parser.add_argument('--rain_parallel_leaves', type=int, default=1,
                      help='rain: leaves expanded per search step (1 = reference)')
  parser.add_argument('--rain_vanilla', type=parse_bool, default=True,
                      help='rain: time vanilla decoding too')
  parser.add_argument('--rain_count_calls', type=parse_bool, default=True,
                      help='rain: a second run, every model call stamped: calls per simulation by phase')
  parser.add_argument('--rain_runs', type=int, choices=(1, 2), default=2,
                      help='rain: 2 = time a second call; 1 = time the first call\'s '
                           'execution (compile timed apart)')
  return parser


def run_rain(args):
  """The rain suite (scripts/bench_rain.py) on --model or --preset weights."""
  import bench_rain  # pylint: disable=import-outside-toplevel
  from models import tokenizer  # pylint: disable=import-outside-toplevel
  from rain_jax import sharding  # pylint: disable=import-outside-toplevel
  on_gpu = jax.default_backend() == 'gpu'
  scan_layers = (not on_gpu) if args.scan_layers is None else args.scan_layers
  if args.model and args.preset:
    raise ValueError('give --model or --preset, not both')
  machine = machine_info(None)
  if args.preset:
    config = presets.get_preset(args.preset, dtype=args.dtype, param_dtype=args.dtype,
                                scan_layers=scan_layers, **args.preset_override)
    params = jax.jit(llama.init_params, static_argnums=0)(config, jax.random.PRNGKey(0))
    model = loading.LoadedModel(name=args.preset, config=config, params=params,
                                tokenizer=tokenizer.load_tokenizer(registry.LLAMA_TOKENIZER))
    weights = 'random (preset, seed 0)'
  else:
    name = args.model or registry.DEFAULT_MODEL
    model = loading.load_model(model=name, dtype=args.dtype, scan_layers=scan_layers)
    weights = f'registry {name}'
  check_rain_settings(args)
  report = bench_rain.run_rain_suite(args, model, sharding.make_mesh('1,1,1',
                                                                     jax.devices()[:1]), log)
  machine['load_average_at_end'] = list(os.getloadavg())
  return {'suite': 'rain', 'machine': machine,
          'model': {'name': model.name, 'weights': weights,
                    'num_params': model.config.num_params, 'dtype': args.dtype,
                    'scan_layers': scan_layers}, **report}


def check_rain_settings(args):
  """Raises ValueError naming the first bad rain flag value."""
  if args.rain_parallel_leaves < 1:
    raise ValueError(f'--rain_parallel_leaves must be >= 1, got {args.rain_parallel_leaves}')


def check_settings(args):
  """Raises ValueError naming the first bad flag value."""
  if args.model and args.preset:
    raise ValueError('give --model or --preset, not both')
  if args.prompt_len < 1:
    raise ValueError(f'--prompt_len must be >= 1, got {args.prompt_len}')
  if args.new_tokens < 2:
    raise ValueError(f'--new_tokens must be >= 2 (one prefill plus at least one decode '
                     f'step), got {args.new_tokens}')
  if args.repeats < 1:
    raise ValueError(f'--repeats must be >= 1, got {args.repeats}')
  if args.peak_bandwidth_gbs is not None and args.peak_bandwidth_gbs <= 0:
    raise ValueError(f'--peak_bandwidth_gbs must be > 0, got {args.peak_bandwidth_gbs}')


def check_context(args, max_seq_len):
  """Raises ValueError when prompt and new tokens do not fit the model's context."""
  if args.prompt_len + args.new_tokens > max_seq_len:
    raise ValueError(f'--prompt_len + --new_tokens = {args.prompt_len + args.new_tokens} '
                     f'exceeds the model context of {max_seq_len} tokens')


def random_prompts(batch_size, prompt_len, vocab_size, seed=PROMPT_SEED):
  """[batch_size, prompt_len] int32 token ids, uniform over the non-control ids."""
  if vocab_size <= FIRST_PROMPT_TOKEN:
    raise ValueError(f'vocab_size {vocab_size} leaves no ids >= {FIRST_PROMPT_TOKEN}')
  rng = np.random.default_rng(seed)
  return rng.integers(FIRST_PROMPT_TOKEN, vocab_size, (batch_size, prompt_len),
                      dtype=np.int32)


def weight_bytes_per_decode_step(config: llama.LlamaConfig):
  """Bytes of parameters one decode step reads: every weight except the embedding table
  (a decode step gathers B of its rows); with tied embeddings the table is read as the LM
  head, so it counts once."""
  itemsize = jnp.dtype(llama.as_dtype(config.param_dtype)).itemsize
  embedding = 0 if config.tie_embeddings else config.vocab_size * config.hidden_size
  return (config.num_params - embedding) * itemsize


def bandwidth_floor(weight_bytes, ms_per_step, peak_bandwidth_gbs):
  """The time reading the weights once takes at peak bandwidth, and its share of a step."""
  floor_ms = weight_bytes / (peak_bandwidth_gbs * 1e9) * 1e3
  return {'floor_ms_per_step': floor_ms, 'measured_ms_per_step': ms_per_step,
          'fraction_of_floor': floor_ms / ms_per_step}


def timed(fn, sync):
  """(seconds, result) of fn(); sync(result) waits until the work is done."""
  start = time.perf_counter()
  result = fn()
  sync(result)
  return time.perf_counter() - start, result


def throughput(prefill_seconds, generate_seconds, batch_size, prompt_len, new_tokens):
  """Tokens/s and step times from the median prefill and generate times (see module doc)."""
  prefill = statistics.median(prefill_seconds)
  gen = statistics.median(generate_seconds)
  decode = gen - prefill
  measured = decode > 0
  if not measured:
    log(f'generate ({gen:.4g} s) took no longer than prefill ({prefill:.4g} s): the decode '
        'time is lost in noise; decode rates are reported as null')
  return {
      'prefill_s_median': prefill, 'generate_s_median': gen, 'decode_s': decode,
      'prefill_tokens_per_s': batch_size * prompt_len / prefill,
      'decode_tokens_per_s': batch_size * new_tokens / decode if measured else None,
      'decode_ms_per_step': decode / (new_tokens - 1) * 1e3 if measured else None,
      'prefill_s_all': prefill_seconds, 'generate_s_all': generate_seconds,
  }


def ratio(ours, theirs):
  """ours / theirs, or None when either is None."""
  return None if ours is None or theirs is None else ours / theirs


def load_rain_jax(args, scan_layers):
  """(name, weights description, config, params) from --model or --preset.

  Raises ValueError when prompt_len + new_tokens exceed the model's context.
  """
  if args.preset:
    config = presets.get_preset(args.preset, dtype=args.dtype, param_dtype=args.dtype,
                                scan_layers=scan_layers, **args.preset_override)
    check_context(args, config.max_seq_len)
    init = jax.jit(llama.init_params, static_argnums=0)
    params = init(config, jax.random.PRNGKey(0))
    return args.preset, 'random (preset, seed 0)', config, jax.block_until_ready(params)
  name = args.model or registry.DEFAULT_MODEL
  loaded = loading.load_model(model=name, dtype=args.dtype, scan_layers=scan_layers)
  check_context(args, loaded.config.max_seq_len)
  return name, f'registry {name}', loaded.config, loaded.params


def _prefill_from_empty(config, cache_len, params, tokens, lengths):
  """kvcache.prefill into a fresh cache of cache_len slots: what `generate` starts with."""
  cache = llama.init_cache(config, tokens.shape[0], cache_len)
  return kvcache.prefill(config, params, tokens, lengths, cache)


def bench_rain_jax(config, params, prompts, new_tokens, repeats):
  """Times rain_jax prefill and greedy generate on prompts [B, P] int32.

  Returns (timings dict, generated tokens [B, new_tokens] int32 of the last call).
  """
  batch_size, prompt_len = prompts.shape
  cache_len = prompt_len + new_tokens
  tokens = jax.device_put(jnp.asarray(prompts))
  lengths = jnp.full((batch_size,), prompt_len, jnp.int32)
  seeds = jnp.zeros((batch_size,), jnp.uint32)
  no_stops = stopping.right_align([])
  no_eos = jnp.int32(-1)

  start = time.perf_counter()
  prefill = jax.jit(_prefill_from_empty, static_argnums=(0, 1)).lower(
      config, cache_len, params, tokens, lengths).compile()
  prefill_compile = time.perf_counter() - start
  start = time.perf_counter()
  gen = generate.generate.lower(config, params, tokens, lengths, seeds, no_stops, no_eos,
                                settings=generate.DecodeSettings(new_tokens, cache_len)).compile()
  generate_compile = time.perf_counter() - start

  run_prefill = lambda: prefill(params, tokens, lengths)
  run_generate = lambda: gen(params, tokens, lengths, seeds, no_stops, no_eos)
  prefill_first, _ = timed(run_prefill, jax.block_until_ready)
  generate_first, out = timed(run_generate, jax.block_until_ready)
  prefill_seconds, generate_seconds = [], []
  for _ in range(repeats):
    prefill_seconds.append(timed(run_prefill, jax.block_until_ready)[0])
    seconds, out = timed(run_generate, jax.block_until_ready)
    generate_seconds.append(seconds)
  num_tokens = np.asarray(out.num_tokens)
  if not np.all(num_tokens == new_tokens):
    raise RuntimeError(f'rain_jax generated {num_tokens.tolist()} tokens per row, expected '
                       f'{new_tokens} each')
  result = {'prefill_compile_s': prefill_compile, 'generate_compile_s': generate_compile,
            'prefill_first_call_s': prefill_first, 'generate_first_call_s': generate_first}
  result.update(throughput(prefill_seconds, generate_seconds, batch_size, prompt_len,
                           new_tokens))
  return result, np.asarray(out.tokens)


def hf_config(config: llama.LlamaConfig):
  """transformers.LlamaConfig with the same architecture."""
  import transformers  # pylint: disable=import-outside-toplevel
  return transformers.LlamaConfig(
      vocab_size=config.vocab_size, hidden_size=config.hidden_size,
      intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
      head_dim=config.head_dim, rope_theta=config.rope_theta, rms_norm_eps=config.rms_eps,
      max_position_embeddings=config.max_seq_len, tie_word_embeddings=config.tie_embeddings,
      attention_bias=False, mlp_bias=False)


def hf_state_dict(config: llama.LlamaConfig, params):
  """transformers LlamaForCausalLM state dict viewing rain_jax params (no copies made).

  Kernels [in, out] become HF weights [out, in] (transposed views); q/k are already in
  HF's rotate_half order (docs/engine.md §1). Stacked layers [L, ...] are indexed.
  """
  import torch  # pylint: disable=import-outside-toplevel
  to_torch = lambda tree: jax.tree.map(torch.from_dlpack, tree)
  if config.scan_layers:
    stacked = to_torch(params['layers'])
    layers = [jax.tree.map(lambda t, i=i: t[i], stacked) for i in range(config.num_layers)]
  else:
    layers = [to_torch(params[f'layers_{i}']) for i in range(config.num_layers)]
  embedding = torch.from_dlpack(params['embed']['embedding'])
  state = {'model.embed_tokens.weight': embedding,
           'model.norm.weight': torch.from_dlpack(params['final_norm']['scale'])}
  for i, layer in enumerate(layers):
    prefix = f'model.layers.{i}.'
    attn, mlp = layer['attn'], layer['mlp']
    state[prefix + 'input_layernorm.weight'] = layer['attn_norm']['scale']
    state[prefix + 'post_attention_layernorm.weight'] = layer['mlp_norm']['scale']
    for ours, theirs in (('wq', 'q_proj'), ('wk', 'k_proj'), ('wv', 'v_proj'),
                         ('wo', 'o_proj')):
      state[prefix + f'self_attn.{theirs}.weight'] = attn[ours]['kernel'].T
    for ours, theirs in (('w_gate', 'gate_proj'), ('w_up', 'up_proj'),
                         ('w_down', 'down_proj')):
      state[prefix + f'mlp.{theirs}.weight'] = mlp[ours]['kernel'].T
  state['lm_head.weight'] = (embedding if config.tie_embeddings
                             else torch.from_dlpack(params['lm_head']).T)
  return state


def build_hf_model(config: llama.LlamaConfig, params, device):
  """An eval-mode LlamaForCausalLM on `device` in config.dtype holding a copy of params."""
  torch = extras.require('torch', 'hf')
  transformers = extras.require('transformers', 'hf')
  with torch.device(device):
    model = transformers.LlamaForCausalLM._from_config(  # pylint: disable=protected-access
        hf_config(config), dtype=getattr(torch, config.dtype))
  model.load_state_dict(hf_state_dict(config, params), strict=True)
  return model.eval()


def bench_hf(model, prompts, new_tokens, repeats):
  """Times HF prefill (one forward) and greedy `generate` on prompts [B, P] int32.

  Returns (timings dict, generated tokens [B, new_tokens] int64 of the last call).
  """
  import torch  # pylint: disable=import-outside-toplevel
  batch_size, prompt_len = prompts.shape
  device = model.device
  input_ids = torch.from_numpy(prompts.astype(np.int64)).to(device)
  attention_mask = torch.ones_like(input_ids)
  sync = ((lambda _: torch.cuda.synchronize(device)) if device.type == 'cuda'
          else (lambda _: None))

  def run_prefill():
    with torch.inference_mode():
      return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                   logits_to_keep=1)

  def run_generate():
    with torch.inference_mode():
      return model.generate(input_ids=input_ids, attention_mask=attention_mask,
                            max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            do_sample=False, use_cache=True, pad_token_id=0)

  prefill_first, _ = timed(run_prefill, sync)
  generate_first, out = timed(run_generate, sync)
  prefill_seconds, generate_seconds = [], []
  for _ in range(repeats):
    prefill_seconds.append(timed(run_prefill, sync)[0])
    seconds, out = timed(run_generate, sync)
    generate_seconds.append(seconds)
  if tuple(out.shape) != (batch_size, prompt_len + new_tokens):
    raise RuntimeError(f'HF generate returned shape {tuple(out.shape)}, expected '
                       f'{(batch_size, prompt_len + new_tokens)}')
  result = {'prefill_first_call_s': prefill_first, 'generate_first_call_s': generate_first}
  result.update(throughput(prefill_seconds, generate_seconds, batch_size, prompt_len,
                           new_tokens))
  return result, out[:, prompt_len:].cpu().numpy()


def same_greedy_prefix(ours, theirs):
  """Mean over rows of the fraction of leading generated tokens both sides agree on.

  ours, theirs: [B, N] token ids.
  """
  differs = np.asarray(ours) != np.asarray(theirs)
  first_difference = np.where(differs.any(axis=1), differs.argmax(axis=1), differs.shape[1])
  return float(np.mean(first_difference / differs.shape[1]))


def package_version(name):
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def cpu_model():
  """The CPU's model name from /proc/cpuinfo (platform.processor() where absent)."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def machine_info(hf_device):
  device = jax.devices()[0]
  info = {
      'cpu_count': os.cpu_count(), 'cpu_model': cpu_model(),
      'load_average_at_start': list(os.getloadavg()), 'platform': platform.platform(),
      'python': platform.python_version(), 'jax': jax.__version__,
      'jaxlib': package_version('jaxlib'), 'flax': package_version('flax'),
      'torch': package_version('torch'), 'transformers': package_version('transformers'),
      'jax_backend': jax.default_backend(), 'jax_device_kind': device.device_kind,
      'jax_device_count': jax.device_count(), 'hf_device': hf_device,
      'environment': {name: os.environ.get(name) for name in THREADING_ENV},
  }
  if hf_device is not None:
    import torch  # pylint: disable=import-outside-toplevel
    info['torch_num_threads'] = torch.get_num_threads()
    if hf_device == 'cuda':
      info['torch_device_name'] = torch.cuda.get_device_name()
  return info


def setup_hf(on_gpu):
  """Chooses and configures HF's device: cuda on a GPU backend, else CPU with one torch
  thread per core."""
  torch = extras.require('torch', 'hf')
  torch.set_num_threads(os.cpu_count())
  if not on_gpu:
    return 'cpu'
  if not torch.cuda.is_available():
    raise RuntimeError('JAX runs on a GPU but torch sees no CUDA device; install a CUDA '
                       'build of torch or pass --skip_hf')
  return 'cuda'


def run_decode_suite(args):
  """Runs the decode suite; returns the report dict."""
  on_gpu = jax.default_backend() == 'gpu'
  scan_layers = (not on_gpu) if args.scan_layers is None else args.scan_layers
  check_settings(args)
  hf_device = None if args.skip_hf else setup_hf(on_gpu)
  machine = machine_info(hf_device)

  log(f'loading {args.preset or args.model or "the default model"} ({args.dtype}, '
      f'scan_layers={scan_layers})')
  name, weights, config, params = load_rain_jax(args, scan_layers)
  hf_model = None
  if hf_device is not None:
    log(f'copying the weights into transformers LlamaForCausalLM on {hf_device}')
    try:
      hf_model = build_hf_model(config, params, hf_device)
      machine['hf_attn_implementation'] = hf_model.config._attn_implementation  # pylint: disable=protected-access
    except Exception as e:  # pylint: disable=broad-except
      # rain_jax's numbers still stand; the report says why HF's are missing.
      machine['hf_error'] = f'{type(e).__name__}: {e}'
      log(f'transformers model not built, timing rain_jax only: {machine["hf_error"]}')

  results = []
  for batch_size in args.batch_sizes:
    prompts = random_prompts(batch_size, args.prompt_len, config.vocab_size)
    log(f'batch {batch_size}: rain_jax')
    row = {'batch_size': batch_size}
    row['rain_jax'], ours = bench_rain_jax(config, params, prompts, args.new_tokens,
                                           args.repeats)
    if hf_model is not None:
      log(f'batch {batch_size}: transformers')
      try:
        row['hf'], theirs = bench_hf(hf_model, prompts, args.new_tokens, args.repeats)
      except Exception as e:  # pylint: disable=broad-except
        row['hf_error'] = f'{type(e).__name__}: {e}'
        log(f'batch {batch_size}: transformers failed: {row["hf_error"]}')
      else:
        row['ratio_rain_jax_over_hf'] = {
            key: ratio(row['rain_jax'][key], row['hf'][key])
            for key in ('prefill_tokens_per_s', 'decode_tokens_per_s')}
        row['same_greedy_prefix'] = same_greedy_prefix(ours, theirs)
    peak_gbs = args.peak_bandwidth_gbs
    if peak_gbs is None and on_gpu and batch_size == 1:
      peak_gbs = 3000.0
    if peak_gbs is not None:
      weight_bytes = weight_bytes_per_decode_step(config)
      row['bandwidth'] = {'weight_bytes_per_step': weight_bytes,
                          'peak_bandwidth_gbs': peak_gbs}
      for side in ('rain_jax', 'hf'):
        if side in row and row[side]['decode_ms_per_step'] is not None:
          row['bandwidth'][side] = bandwidth_floor(
              weight_bytes, row[side]['decode_ms_per_step'], peak_gbs)
    results.append(row)
    log(f'batch {batch_size}: ' + json.dumps({
        side: {k: row[side][k] for k in ('prefill_tokens_per_s', 'decode_tokens_per_s')}
        for side in ('rain_jax', 'hf') if side in row}))
    log('row ' + json.dumps(row))

  machine['load_average_at_end'] = list(os.getloadavg())
  return {
      'suite': 'decode',
      'machine': machine,
      'model': {'name': name, 'weights': weights, 'num_params': config.num_params,
                'weight_bytes_per_decode_step': weight_bytes_per_decode_step(config),
                'config': json.loads(config.to_json())},
      'settings': {'prompt_len': args.prompt_len, 'new_tokens': args.new_tokens,
                   'batch_sizes': args.batch_sizes, 'dtype': args.dtype,
                   'repeats': args.repeats, 'scan_layers': scan_layers,
                   'prompts': f'uniform random ids in [{FIRST_PROMPT_TOKEN}, vocab), '
                              f'numpy seed {PROMPT_SEED}',
                   'greedy': True, 'persistent_compilation_cache': False},
      'results': results,
      'definitions': {
          'prefill_tokens_per_s': 'batch * prompt_len / median prefill seconds',
          'decode_tokens_per_s': 'batch * new_tokens / (median generate - median prefill)',
          'decode_ms_per_step': '(median generate - median prefill) / (new_tokens - 1)',
          'first_call_s': 'the first (warm-up) call, excluded from the medians; '
                          'rain_jax compile time is measured apart (lower + compile)',
          'rain_jax_prefill': 'kvcache.prefill: logits at every prompt position',
          'hf_prefill': 'forward with use_cache and logits_to_keep=1, as generate does',
          'same_greedy_prefix': 'mean fraction of leading new tokens equal on both sides',
      },
  }


def main(argv=None):
  args = build_parser().parse_args(argv)
  try:
    if args.batch_sizes is None:
      args.batch_sizes = [1, 16] if args.suite == 'decode' else [1, 8]
    with contextlib.redirect_stdout(sys.stderr):
      report = run_decode_suite(args) if args.suite == 'decode' else run_rain(args)
  except ValueError as e:
    print(f'bench: error: {e}', file=sys.stderr)
    return 2
  print(json.dumps(report, indent=1))
  return 0


if __name__ == '__main__':
  sys.exit(main())
