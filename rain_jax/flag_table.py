"""Every flag of `python -m rain_jax.run`, declared once with its roles.

rain_jax/run.py defines its absl flags from `TABLE` (`define_flags`); the other modules
read the sets they need from it instead of keeping their own lists:

  role         which flag changes make an output's answers incomparable
               (rain_jax/results.py, the `<output>.config.json` check):
                 ANSWER       the answers depend on it (model, weights, task, decoding,
                              search); a restart that changes it is refused.
                 SELECTION    it chooses which (prompt, method) pairs a session answers;
                              extending a run with more examples, another shard or the
                              other method appends to the same results.
                 OPERATIONAL  how a run executes, not what it answers.
  task         the task whose constructor takes the flag as an option of the same name
               (rain_jax/tasks/__init__.py).
  rain         the flag sets the RainConfig field of its name when it is not None
               (rain_jax/run.py); unset RAIN flags leave the task's reference constants.
  weights      a weight source besides a registry --model (scripts/sweep.py).
  identity     names what a report row is of (model, weights, task, prompts), so it is not
               a setting that tells rows apart (scripts/report.py).

batch_size, mesh and scan_layers are operational: every random draw is a function of the
seed and the example index alone (docs/engine.md §3), so they change only the shapes the
arithmetic runs in (floating-point rounding), not what is computed.
"""
import dataclasses
from typing import Any, Optional

from absl import flags

ANSWER = 'answer'
SELECTION = 'selection'
OPERATIONAL = 'operational'
ROLES = (ANSWER, SELECTION, OPERATIONAL)
KINDS = ('string', 'enum', 'bool', 'integer', 'float')


@dataclasses.dataclass(frozen=True)
class Flag:
  """One command-line flag: its absl definition (kind, default, help, enum_values) and
  its roles (see the module docstring)."""
  name: str
  kind: str
  default: Any
  help: str
  role: str = ANSWER
  enum_values: tuple = ()
  task: Optional[str] = None
  rain: bool = False
  weights: bool = False
  identity: bool = False

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'flag {self.name}: kind must be one of {KINDS}, got {self.kind!r}')
    if self.role not in ROLES:
      raise ValueError(f'flag {self.name}: role must be one of {ROLES}, got {self.role!r}')
    if bool(self.enum_values) != (self.kind == 'enum'):
      raise ValueError(f'flag {self.name}: enum_values go with kind enum, and only there')


TABLE = (
    # Model.
    Flag('model', 'string', None, 'Registry name, e.g. smollm2-135m-instruct (the default '
         'when no other weight source is given).', identity=True),
    Flag('checkpoint', 'string', None, 'Orbax checkpoint written by '
         'scripts/convert_checkpoint.py.', weights=True, identity=True),
    Flag('hf_dir', 'string', None, 'HF directory with config.json and *.safetensors.',
         weights=True, identity=True),
    Flag('gguf', 'string', None, 'A LLaMA-architecture GGUF file.', weights=True,
         identity=True),
    Flag('tokenizer', 'string', None, 'tokenizer.model / tokenizer.json / .gguf (when the '
         'weights do not carry one).', identity=True),
    Flag('dtype', 'enum', 'float32', 'Parameter and compute dtype.',
         enum_values=('float32', 'bfloat16')),
    Flag('scan_layers', 'bool', True, 'Scan over stacked layers (fast compiles; CPU) or '
         'unroll them (faster decoding on GPU/TPU).', role=OPERATIONAL),
    Flag('mesh', 'string', '-1,1,1', 'Device mesh data,fsdp,tensor; -1 = the rest.',
         role=OPERATIONAL),
    Flag('judge_model', 'string', None, 'RAIN: a registry name for a second model that '
         'reads the self-evaluation prompt instead of the policy (the original\'s evaluator '
         'slot; not the reference, which judges itself). It must share the policy\'s '
         'tokenizer; weights as for --model, from --judge_hf_dir / --judge_checkpoint when '
         'the registry entry needs them.'),
    Flag('judge_checkpoint', 'string', None, 'RAIN judge model: an orbax checkpoint '
         '(like --checkpoint).'),
    Flag('judge_hf_dir', 'string', None, 'RAIN judge model: an HF directory (like '
         '--hf_dir).'),
    Flag('judge_gguf', 'string', None, 'RAIN judge model: a LLaMA GGUF file (like --gguf).'),
    Flag('judge_tokenizer', 'string', None, 'RAIN judge model: its tokenizer file when its '
         'weights carry none (default: --tokenizer); it must equal the policy\'s.'),
    Flag('max_programs', 'integer', 3, 'Compile at most this many programs (padded '
         'prompt widths) in a run; with --method=both vanilla gets one, RAIN the rest. '
         'Each batch pads to the nearest width that holds it.', role=OPERATIONAL),
    Flag('continuous_batching', 'bool', False, 'RAIN: a row whose prompt is answered '
         'takes the next prompt while the other rows keep searching (same answers; '
         'rain_jax/engine.py run_stream), instead of each batch waiting for its slowest '
         'prompt.', role=OPERATIONAL),
    Flag('device_memory_gib', 'float', None, 'Memory of one device to check the compiled '
         'programs against before the weights load (default: what the runtime reports; '
         'the CPU reports none).', role=OPERATIONAL),
    Flag('distributed', 'bool', False, 'Join a multi-process JAX job (multi-host): with '
         'no coordinates given, JAX detects them on Cloud TPU VMs, under SLURM or Open MPI. '
         'Process 0 alone writes --output.', role=OPERATIONAL),
    Flag('coordinator_address', 'string', None, 'Multi-process: HOST:PORT of process 0 '
         '(with --num_processes and --process_id; implies --distributed).',
         role=OPERATIONAL),
    Flag('num_processes', 'integer', None, 'Multi-process: how many processes form the job.',
         role=OPERATIONAL),
    Flag('process_id', 'integer', None, 'Multi-process: this process, in [0, '
         '--num_processes).', role=OPERATIONAL),
    Flag('peer_timeout_seconds', 'float', 20.0, 'Multi-process: a process that has not '
         'been heard from for this long ends every process, with an error naming it.',
         role=OPERATIONAL),
    # Task.
    Flag('task', 'string', 'hh', 'Task: hh, adv, truthfulqa, sentiment or custom.',
         identity=True),
    Flag('prompt_file', 'string', None, 'custom: JSONL of {"id", "prompt"}.', task='custom',
         identity=True),
    Flag('turn_marker', 'string', None, 'custom: text that ends an answer (optional).',
         task='custom', identity=True),
    Flag('prompt_template', 'string', None, 'custom: template with one {prompt} '
         'placeholder (default: the prompt verbatim).', task='custom'),
    Flag('judge_prompts', 'string', None, 'custom: judge prompt folder (a name under '
         'rain_jax/data/prompts, e.g. HH, or a path holding f2/r1/r2.txt).', task='custom'),
    Flag('suffix_file', 'string', None, 'adv: GCG suffix file ([{"goal", "controls"}]; '
         'a name under rain_jax/data/gcg or a path).', task='adv'),
    Flag('target_sentiment', 'enum', None,
         'sentiment: the sentiment to steer continuations toward.',
         enum_values=('positive', 'negative'), task='sentiment'),
    Flag('start', 'integer', 0, 'First example index.', role=SELECTION),
    Flag('num_examples', 'integer', 5, 'How many examples (-1: all).', role=SELECTION),
    Flag('shard_index', 'integer', 0, 'This process answers the chosen examples whose '
         'dataset index modulo --num_shards is --shard_index.', role=SELECTION),
    Flag('num_shards', 'integer', 1, 'How many shards split the chosen examples.',
         role=SELECTION),
    # Decoding.
    Flag('method', 'enum', 'vanilla', 'Decoding method.',
         enum_values=('vanilla', 'rain', 'both'), role=SELECTION),
    Flag('max_new_tokens', 'integer', 128, 'New tokens per answer at most.', rain=True),
    Flag('batch_size', 'integer', 8, 'Prompts decoded together.', role=OPERATIONAL),
    Flag('seed', 'integer', 0, 'Run seed (mixed with each example index).', rain=True),
    Flag('temperature', 'float', 0.0, 'Vanilla sampling temperature; 0 = greedy.'),
    Flag('top_k', 'integer', 0, 'Vanilla top-k (0 = off).'),
    Flag('top_p', 'float', 1.0, 'Vanilla nucleus top-p (1 = off).'),
    # RAIN (the task's reference constants unless set: its class's rain_defaults,
    # applied by tasks.rain_config).
    Flag('max_T', 'integer', None, 'Simulations per committed set (reference 50).', rain=True),
    Flag('min_T', 'integer', None, 'Early stop needs the best child to have fn > min_T.',
         rain=True),
    Flag('value_threshold', 'float', None, 'Early stop needs the best child q > this (Vt).',
         rain=True),
    Flag('c_puct', 'float', None, 'PUCT exploration constant (reference 2).', rain=True),
    Flag('num_candidates', 'integer', None, 'Candidates per expansion (k, reference 10).',
         rain=True),
    Flag('max_children', 'integer', None, 'Children per node at most (reference 20).', rain=True),
    Flag('similarity', 'enum', 'minilm',
         'Embedding behind similarity sharing and widening: all-MiniLM-L6-v2 on the '
         'decoded text (the reference), the policy\'s mean final hidden state '
         '(L2-normalised; not the reference), or none.',
         enum_values=('minilm', 'mean_hidden', 'none'), rain=True),
    Flag('sim_threshold', 'float', None, 'Cosine threshold of similarity sharing (0.95).',
         rain=True),
    Flag('sim_weight', 'float', None, 'Weight of similarity sharing (0.2).', rain=True),
    Flag('parallel_leaves', 'integer', 1, 'Leaves judged per step (virtual loss); 1 = '
         'reference.', rain=True),
    Flag('num_nodes', 'integer', None, 'Tree capacity per prompt.', rain=True),
    Flag('max_depth', 'integer', None, 'Selection depth cap below the root.', rain=True),
    Flag('max_rollout', 'integer', None, 'Rollout length cap (tokens).', rain=True),
    Flag('dump_tree', 'bool', False, 'Add the root children statistics at every commit '
         'to each RAIN record ("tree_dump").', role=OPERATIONAL),
    # Output.
    Flag('output', 'string', 'out/results.jsonl', 'JSONL results file (appended; '
         'one per process).', role=OPERATIONAL),
    Flag('summary', 'bool', True, 'At the end, print a Markdown summary of the chosen '
         "prompts' answers and RAIN searches to stderr and write it to "
         '<output>.summary.md (scripts/sweep.py turns it off).', role=OPERATIONAL),
    Flag('allow_config_change', 'bool', False, 'Append to an --output whose answers were '
         'made with other settings (see <output>.config.json).', role=OPERATIONAL),
    Flag('compilation_cache', 'string', None,
         'Persistent XLA compilation cache folder (default: xla/ in the model '
         'cache, $RAIN_JAX_CACHE or ~/.cache/rain_jax; "" = off).', role=OPERATIONAL),
)


# The flags that name and place a model: `python -m rain_jax.train` takes them as run
# does, and a sweep passes a run's values on to its training stage.
MODEL_FLAGS = ('model', 'checkpoint', 'hf_dir', 'gguf', 'tokenizer', 'dtype', 'scan_layers',
               'mesh', 'compilation_cache')
DISTRIBUTED_FLAGS = ('distributed', 'coordinator_address', 'num_processes', 'process_id',
                     'peer_timeout_seconds')


def names_with_role(role: str) -> frozenset:
  """Names of the flags whose role is `role` (ANSWER, SELECTION or OPERATIONAL)."""
  if role not in ROLES:
    raise ValueError(f'role must be one of {ROLES}, got {role!r}')
  return frozenset(flag.name for flag in TABLE if flag.role == role)


def task_flags() -> dict:
  """{task name: (flag names it takes as options, in table order)}."""
  options = {}
  for flag in TABLE:
    if flag.task:
      options[flag.task] = options.get(flag.task, ()) + (flag.name,)
  return options


ANSWER_FLAGS = names_with_role(ANSWER)
SELECTION_FLAGS = names_with_role(SELECTION)
OPERATIONAL_FLAGS = names_with_role(OPERATIONAL)
TASK_FLAGS = task_flags()
RAIN_FLAGS = tuple(flag.name for flag in TABLE if flag.rain)  # RainConfig field names
WEIGHT_FLAGS = tuple(flag.name for flag in TABLE if flag.weights)
IDENTITY_FLAGS = frozenset(flag.name for flag in TABLE if flag.identity)


def rain_overrides(flag_values) -> dict:
  """{RainConfig field: value} of the RAIN flags set (not None) in `flag_values`."""
  return {name: getattr(flag_values, name) for name in RAIN_FLAGS
          if getattr(flag_values, name) is not None}


def define_flags(flag_values=None, names=None) -> None:
  """Defines every flag of TABLE (or those in `names`) with absl, in table order, as
  flags of the calling module (so `--helpshort` and `FLAGS.get_flags_for_module` list
  them under it)."""
  flags.disclaim_key_flags()  # attribute the definitions below to our caller
  flag_values = flags.FLAGS if flag_values is None else flag_values
  if names is not None:
    unknown = sorted(set(names) - {flag.name for flag in TABLE})
    if unknown:
      raise ValueError(f'no flags named {unknown} in the table')
  for flag in TABLE:
    if names is not None and flag.name not in names:
      continue
    if flag.kind == 'enum':
      flags.DEFINE_enum(flag.name, flag.default, list(flag.enum_values), flag.help,
                        flag_values=flag_values)
    else:
      define = {'string': flags.DEFINE_string, 'bool': flags.DEFINE_bool,
                'integer': flags.DEFINE_integer, 'float': flags.DEFINE_float}[flag.kind]
      define(flag.name, flag.default, flag.help, flag_values=flag_values)
