"""Turns the model flags into (config, params on the mesh, tokenizer).

Weight paths go through `etils.epath`, so an orbax `--checkpoint` (and an `--hf_dir`)
may be a gs:// folder; a GGUF file must be local (it is memory-mapped).
"""
import dataclasses
import re

from models import convert, gguf, llama, registry
from models.tokenizer import Tokenizer, load_tokenizer
from rain_jax import sharding


@dataclasses.dataclass
class LoadedModel:
  """A model ready to run.

  Attributes:
    name: the registry name, or the weight file / directory's base name.
    config: the architecture (from the GGUF metadata, config.json or the checkpoint).
    params: the parameter tree, on the mesh's parameter shardings when a mesh was given;
      None until `load_params` (a model from `describe_model`).
    tokenizer: the model's tokenizer.
    source: (format 'gguf' | 'hf' | 'orbax', path) of the weights; None when the
      parameters were made in memory.
  """
  name: str
  config: llama.LlamaConfig
  params: dict | None
  tokenizer: Tokenizer
  source: tuple | None = None


def _weights_location(model, checkpoint, hf_dir, gguf_path):
  """(format, path, tokenizer path or None, name) from exactly one weight source."""
  given = [(flag, value) for flag, value in (('--checkpoint', checkpoint),
                                             ('--hf_dir', hf_dir), ('--gguf', gguf_path))
           if value]
  if len(given) > 1:
    raise ValueError(f'give one weight source, not {" and ".join(f for f, _ in given)}')
  if model:
    source = registry.resolve_model(model, hf_dir=hf_dir, checkpoint=checkpoint)
    return source.weights_format, source.weights_path, source.tokenizer_path, model
  if not given:
    raise ValueError('no model: pass --model (a registry name), --checkpoint, --hf_dir '
                     'or --gguf')
  flag, path = given[0]
  location = convert.as_path(path)
  if not location.exists():
    raise FileNotFoundError(f'{flag}: {path} does not exist')
  fmt = {'--checkpoint': 'orbax', '--hf_dir': 'hf', '--gguf': 'gguf'}[flag]
  return fmt, path, None, location.name


def _find_tokenizer(fmt, path, tokenizer_flag, registry_tokenizer, fallback=None):
  """The tokenizer to load: the flag's, the registry's, the weights' own, else
  `fallback` (a judge model's: the policy's --tokenizer)."""
  if tokenizer_flag:
    return tokenizer_flag
  if registry_tokenizer:
    return registry_tokenizer
  if fmt == 'gguf':
    return path
  if fmt == 'hf' and (fallback is None or any(
      convert.as_path(path).joinpath(name).exists()
      for name in ('tokenizer.model', 'tokenizer.json'))):
    return path  # load_tokenizer looks for tokenizer.json / tokenizer.model inside
  if fallback:
    return fallback
  raise ValueError('--checkpoint needs --tokenizer (a tokenizer.model, tokenizer.json or '
                   '.gguf file), or --model naming the registry entry it was converted from')


def _config(fmt, path, dtype, scan_layers):
  if fmt == 'gguf':
    meta = gguf.read_gguf(path)
    return convert.config_from_gguf(meta.metadata, meta.tensors, dtype=dtype,
                                    scan_layers=scan_layers)
  if fmt == 'hf':
    return convert.config_from_hf(convert.read_hf_config(path), dtype=dtype,
                                  scan_layers=scan_layers)
  # Either layer layout restores into either (convert.restore_params).
  return convert.load_config(path).replace(dtype=dtype, scan_layers=scan_layers)


def describe_model(*, model=None, checkpoint=None, hf_dir=None, gguf_path=None,
                   tokenizer=None, dtype='float32', scan_layers=True,
                   fallback_tokenizer=None) -> LoadedModel:
  """The model's name, architecture and tokenizer, without its weights (params None):
  enough to compile its programs and check that they fit before loading anything.
  fallback_tokenizer: the tokenizer file to use when neither `tokenizer` nor the
  weights name one."""
  fmt, path, registry_tokenizer, name = _weights_location(model, checkpoint, hf_dir,
                                                          gguf_path)
  config = _config(fmt, path, dtype, scan_layers)
  tok = load_tokenizer(_find_tokenizer(fmt, path, tokenizer, registry_tokenizer,
                                       fallback_tokenizer))
  if tok.vocab_size > config.vocab_size:
    raise ValueError(f'tokenizer has {tok.vocab_size} tokens but the model only '
                     f'{config.vocab_size}')
  return LoadedModel(name=name, config=config, params=None, tokenizer=tok,
                     source=(fmt, path))


def describe_judge_model(policy: LoadedModel, *, model=None, checkpoint=None, hf_dir=None,
                         gguf_path=None, tokenizer=None, dtype='float32', scan_layers=True,
                         policy_tokenizer=None) -> LoadedModel | None:
  """The judge model RAIN's self-evaluation prompt is read by, when one is named (else
  None: the policy judges itself). The judge reads the policy's token ids (the judged
  text never leaves token space), so both must share one tokenizer: ValueError naming
  the difference otherwise. policy_tokenizer: the policy's --tokenizer, used for judge
  weights that carry no tokenizer of their own. Errors name the --judge_* flags."""
  if not any((model, checkpoint, hf_dir, gguf_path)):
    if tokenizer:
      raise ValueError('--judge_tokenizer needs a judge model (--judge_model, '
                       '--judge_checkpoint, --judge_hf_dir or --judge_gguf)')
    return None
  try:
    judge = describe_model(model=model, checkpoint=checkpoint, hf_dir=hf_dir,
                           gguf_path=gguf_path, tokenizer=tokenizer, dtype=dtype,
                           scan_layers=scan_layers, fallback_tokenizer=policy_tokenizer)
  except (ValueError, FileNotFoundError) as e:
    message = re.sub(r'--(model|checkpoint|hf_dir|gguf|tokenizer)\b', r'--judge_\1', str(e))
    raise type(e)(f'judge model: {message}') from None
  check_shared_tokenizer(policy, judge)
  return judge


def check_shared_tokenizer(policy: LoadedModel, judge: LoadedModel) -> None:
  """ValueError naming the first difference unless the judge model's tokenizer is the
  policy's (`tokenizer_difference`)."""
  difference = tokenizer_difference(policy.tokenizer, judge.tokenizer)
  if difference:
    raise ValueError(f'judge model {judge.name} does not share the policy\'s tokenizer '
                     f'({difference}); the judge reads the policy\'s token ids, so both '
                     f'models need one tokenizer')


def tokenizer_difference(a: Tokenizer, b: Tokenizer) -> str | None:
  """None when `a` and `b` map every id to the same bytes (and agree on BOS/EOS), else
  what first differs."""
  if a.vocab_size != b.vocab_size:
    return f'{a.vocab_size} vs {b.vocab_size} tokens'
  for name in ('bos_id', 'eos_id'):
    if getattr(a, name) != getattr(b, name):
      return f'{name} {getattr(a, name)} vs {getattr(b, name)}'
  for i in range(a.vocab_size):
    if a.token_bytes(i) != b.token_bytes(i):
      return f'token {i} is {a.token_bytes(i)!r} vs {b.token_bytes(i)!r}'
  return None


def load_params(model: LoadedModel, shardings=None):
  """The weights of a described model, loaded straight into `shardings` (a pytree of
  NamedSharding like the parameters; None: the default device)."""
  fmt, path = model.source
  if fmt == 'gguf':
    return convert.params_from_gguf(path, model.config, shardings=shardings)
  if fmt == 'hf':
    return convert.params_from_hf_dir(path, model.config, shardings=shardings)
  return convert.restore_params(path, model.config, shardings=shardings)


def load_model(*, model=None, checkpoint=None, hf_dir=None, gguf_path=None, tokenizer=None,
               dtype='float32', scan_layers=True, mesh=None) -> LoadedModel:
  """Loads weights straight into the mesh's parameter shardings (None: default device)."""
  loaded = describe_model(model=model, checkpoint=checkpoint, hf_dir=hf_dir,
                          gguf_path=gguf_path, tokenizer=tokenizer, dtype=dtype,
                          scan_layers=scan_layers)
  shardings = None
  if mesh is not None:
    shardings = sharding.param_shardings(llama.param_shapes(loaded.config), mesh,
                                         head_dim=loaded.config.head_dim)
  loaded.params = load_params(loaded, shardings)
  return loaded
