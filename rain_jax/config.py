"""RAIN search settings: one frozen dataclass, built from flags or by hand."""
import dataclasses

SIMILARITIES = ('minilm', 'mean_hidden', 'none')
# Other names of the tasks (the reference calls TruthfulQA "truth").


@dataclasses.dataclass(frozen=True)
class RainConfig:
  """Settings of the search (defaults: the reference's HH constants).

  Reference constants: max_T, min_T, value_threshold (Vt), c_puct, num_candidates (k),
  sample_top (top-15 sampling), max_children, maxlen, sim_threshold, sim_weight,
  var_scale, propose_temperature (multi-token proposals and one-token priors; adv 2),
  sample_attempts_factor (k-1 or 2k-1 attempts), rollout_stops_at_clause_end.

  similarity: the text embedding behind similarity sharing and widening (§5, §6):
    'minilm' (the reference: all-MiniLM-L6-v2 on the decoded text, unit vectors),
    'mean_hidden' (mean of the policy's final hidden states, L2-normalised; cheaper,
    not the reference) or 'none' (no sharing; widening never fires).

  Per-task stopping rules of the original (docs/algorithm.md §4):
    terminal_eos_in_path: a leaf is terminal when EOS is anywhere in the text (adv)
      rather than in the leaf's own token set (HH, truth).
    rollout_stops_at_path_eos: a rollout does not start when the text already holds
      EOS (truth); HH and adv stop only on a sampled EOS.
    search_stops_at_turn_marker: a new turn marker ends rollouts, makes a leaf
      terminal and ends the generation (HH, adv); truth ignores it.

  Array capacities (not in the reference, which has unbounded Python structures; each
  limit that is reached is counted in the output, never silent):
    max_new_tokens: generated tokens per prompt; acts as maxlen = prompt + max_new - 1.
    num_nodes: tree nodes per prompt (children that do not fit count as overflows).
    max_depth: selection depth below the root; a leaf that deep is not expanded.
    max_rollout: rollout tokens; a rollout cut there counts as a truncation.
  Non-reference options: parallel_leaves (virtual loss, P leaves per step; 1 = reference).
  """
  max_T: int = 50
  min_T: int = 6
  value_threshold: float = 0.8
  c_puct: float = 2.0
  num_candidates: int = 10
  sample_top: int = 15
  max_children: int = 20
  max_tokens_per_node: int = 10
  maxlen: int = 2048
  sim_threshold: float = 0.95
  sim_weight: float = 0.2
  var_scale: float = 0.03
  propose_temperature: float = 1.0
  sample_attempts_factor: int = 1
  rollout_stops_at_clause_end: bool = True
  terminal_eos_in_path: bool = False
  rollout_stops_at_path_eos: bool = False
  search_stops_at_turn_marker: bool = True
  similarity: str = 'minilm'
  max_new_tokens: int = 128
  num_nodes: int = 1024
  max_depth: int = 8
  max_rollout: int = 64
  feed_chunk: int = 16
  parallel_leaves: int = 1
  seed: int = 0

  def __post_init__(self):
    positive = ('max_T', 'num_candidates', 'sample_top', 'max_children',
                'max_tokens_per_node', 'maxlen', 'sample_attempts_factor', 'max_new_tokens',
                'num_nodes', 'max_depth', 'max_rollout', 'feed_chunk', 'parallel_leaves')
    for name in positive:
      if getattr(self, name) < 1:
        raise ValueError(f'RainConfig.{name} must be >= 1, got {getattr(self, name)}')
    if self.similarity not in SIMILARITIES:
      raise ValueError(f'RainConfig.similarity must be one of {SIMILARITIES}, got '
                       f'{self.similarity!r}')
    if self.min_T < 0:
      raise ValueError(f'RainConfig.min_T must be >= 0, got {self.min_T}')
    if self.propose_temperature <= 0:
      raise ValueError(f'propose_temperature must be > 0, got {self.propose_temperature}')
    if self.sample_top > self.max_children:
      raise ValueError(f'sample_top={self.sample_top} must be <= max_children='
                       f'{self.max_children} (widening samples from the stored top logits)')
    if self.num_candidates > self.max_children:
      raise ValueError(f'num_candidates={self.num_candidates} must be <= max_children='
                       f'{self.max_children}')

  def replace(self, **changes):
    return dataclasses.replace(self, **changes)

  @property
  def sample_attempts(self) -> int:
    """Sampling attempts per multi-token proposal (k-1; adv 2k-1)."""
    return self.sample_attempts_factor * self.num_candidates - 1

  @property
  def widen_attempts(self) -> int:
    """Sampling attempts when widening (k = 2: one sample; adv three)."""
    return self.sample_attempts_factor * 2 - 1
