"""Plain-Python oracle of RAIN as the original implementation runs it.

Written from docs/algorithm.md alone, step for step, so that the JAX engine
can be tested against it. Section numbers (§) refer to that document. Where it leaves a
choice open, docs/engine.md decides (noise counters §3, candidate and child ordering),
and a comment says so.

Tree statistics are Python floats (float64). Sampling is done in float32 on purpose:
a categorical draw is `argmax_v float32(z_v) / float32(t) + gumbel_py(u_v)` with
`u_v = uniform_py(seed, purpose, a, b, c, v)`, which is what a float32 engine computes,
so both sides draw the same tokens. No other randomness is used.
"""
import dataclasses
import math
from typing import NamedTuple, Protocol

import numpy as np

from rain_jax.noise import PROPOSE, ROLLOUT, WIDEN, gumbel_py, uniform_py

# §3: qhat = (q - minq) / (maxq - minq + QHAT_EPS).
QHAT_EPS = 1e-5
# §3, §2: root prior smoothing p <- PRIOR_KEEP * p + (1 - PRIOR_KEEP) / #children.
PRIOR_KEEP = 0.75
# §2: an outer step runs at least this many simulations: range(done, max(maxT, done + 15)).
MIN_SEARCHES_PER_COMMIT = 15
# Norm floor of the cosine similarity (torch.nn.functional.cosine_similarity uses 1e-8).
COSINE_EPS = 1e-8


@dataclasses.dataclass(eq=False)
class Node:
  """One search-tree node (§1).

  tokens: the token set this node appends to its parent's text, 1..10 ids (the first
    root of a generation holds ()).
  n: visit count, fractional after similarity sharing; fn: real visits.
  q: mean value; p: prior.
  emb: running-mean embedding [E] of the texts below this node, None until visited.
  step: depth from the first root of the generation.
  stored_top: (id, raw logit) of the top logits at a one-token expansion, descending
    logit (ties: lower id first); read by one-token widening.
  cand_list: the multi-token candidate list (tokens, weight), greedy first.
  minq, maxq: the value range used by PUCT, meaningful on the root only.
  """
  tokens: tuple = ()
  parent: "Node | None" = dataclasses.field(default=None, repr=False)
  children: list = dataclasses.field(default_factory=list, repr=False)
  n: float = 0.0
  fn: int = 0
  q: float = 0.0
  p: float = 0.0
  emb: list | None = None
  step: int = 0
  stored_top: list | None = None
  cand_list: list | None = None
  minq: float = -1.0
  maxq: float = 1.0


# ------------------------------------------------------------------------ tree statistics


def token_set_len(step):
  """Tokens per node at a depth (§1): step 0 -> 1, 1 -> 2, 2 -> 4, >= 3 -> 10."""
  if step < 0:
    raise ValueError(f"step must be >= 0, got {step}")
  return (1, 2, 4)[step] if step < 3 else 10


def puct_score(child, parent, root, c_puct=2.0):
  """score(c) = qhat + c_puct * c.p * sqrt(parent.n) / (1 + c.n) (§3).

  qhat = 0 for an unvisited child, else its q min-max normalised by the root's range.
  """
  if child.n == 0:
    qhat = 0.0
  else:
    qhat = (child.q - root.minq) / (root.maxq - root.minq + QHAT_EPS)
  return qhat + c_puct * child.p * math.sqrt(parent.n) / (1.0 + child.n)


def select_child(node, root, c_puct=2.0):
  """The child with the highest PUCT score; the first maximum in child order wins."""
  if not node.children:
    raise ValueError("select_child: node has no children")
  best, best_score = None, -math.inf
  for child in node.children:
    score = puct_score(child, node, root, c_puct)
    if score > best_score:
      best, best_score = child, score
  return best


def most_visited_child(node):
  """The child with the largest n; ties -> largest q; then the first. None if no children."""
  best = None
  for child in node.children:
    if best is None or (child.n, child.q) > (best.n, best.q):
      best = child
  return best


# ------------------------------------------------------------------ priors and expansion


def smooth_priors(priors):
  """p <- 0.75 p + 0.25 / m over m priors, renormalised to sum 1."""
  m = len(priors)
  smoothed = [PRIOR_KEEP * p + (1.0 - PRIOR_KEEP) / m for p in priors]
  total = sum(smoothed)
  return [p / total for p in smoothed]


def priors_from_weights(weights, is_root):
  """Priors = weights / sum(weights), then root smoothing when the node is the root (§3)."""
  total = sum(weights)
  if not weights or total <= 0:
    raise ValueError(f"candidate weights must be non-empty with a positive sum, got {weights}")
  priors = [w / total for w in weights]
  return smooth_priors(priors) if is_root else priors


def add_child(node, tokens, prior):
  """Appends a fresh child (n = fn = q = 0, no embedding) holding `tokens`."""
  child = Node(tokens=tuple(tokens), parent=node, p=prior, step=node.step + 1)
  node.children.append(child)
  return child


def expand(node, candidates, is_root, stored_top=None):
  """Gives a leaf one child per candidate, in candidate order (§3).

  candidates: [(tokens, weight)], greedy first for multi-token sets, descending logit
    for one-token sets (engine.md §4).
  stored_top: [(id, raw logit)] kept for one-token widening (§5).
  A multi-token candidate list is stored on the node for widening.
  """
  if node.children:
    raise ValueError("expand: node already has children")
  if not candidates:
    raise ValueError("expand: no candidates")
  priors = priors_from_weights([w for _, w in candidates], is_root)
  for (tokens, _), prior in zip(candidates, priors):
    add_child(node, tokens, prior)
  node.stored_top = None if stored_top is None else list(stored_top)
  multi_token = len(candidates[0][0]) > 1
  node.cand_list = [(tuple(t), w) for t, w in candidates] if multi_token else None


# ------------------------------------------------------------------------------ widening


def unbiased_variance_norm(embeddings):
  """L2 norm of the element-wise unbiased variance of m >= 2 vectors [m, E]."""
  m = len(embeddings)
  if m < 2:
    raise ValueError(f"unbiased variance needs at least 2 vectors, got {m}")
  dims = len(embeddings[0])
  total = 0.0
  for d in range(dims):
    column = [e[d] for e in embeddings]
    mean = sum(column) / m
    variance = sum((x - mean) ** 2 for x in column) / (m - 1)
    total += variance**2
  return math.sqrt(total)


def should_add_child(node, max_children=20, var_scale=0.03):
  """Widening test at a non-leaf node on the selection path (§5).

  True when the node has fewer than max_children children, all of them embedded,
  ‖unbiased var of their embeddings‖₂ < var_scale * len(first child's tokens), and
  every child's q < 0. With a single child the unbiased variance is undefined (NaN in
  the original, and NaN < x is false), so the answer is False.
  """
  children = node.children
  if not children or len(children) >= max_children:
    return False
  if any(c.emb is None for c in children) or len(children) < 2:
    return False
  spread = unbiased_variance_norm([c.emb for c in children])
  return spread < var_scale * len(children[0].tokens) and max(c.q for c in children) < 0


def add_children_one_token(node, is_root):
  """One-token widening (§5): priors from the top-(#children + 1) stored logits.

  Softmax at temperature 1 over those logits (also for adv: the stored logits are raw);
  tokens with zero probability are dropped as in a one-token proposal; root smoothing if
  root; tokens not yet children are appended in ascending id with their priors,
  existing priors are untouched.
  """
  if node.stored_top is None:
    raise ValueError("add_children_one_token: node has no stored top logits")
  top = node.stored_top[:len(node.children) + 1]
  probs = softmax([logit for _, logit in top], 1.0)
  kept = [(token, p) for (token, _), p in zip(top, probs) if p > 0]
  priors = priors_from_weights([p for _, p in kept], is_root)
  present = {c.tokens for c in node.children}
  # The original walks the vocabulary with np.where: new tokens come in ascending id.
  for (token, _), prior in sorted(zip(kept, priors), key=lambda e: e[0][0]):
    if (token,) not in present:
      add_child(node, (token,), prior)


def add_children_multi(node, new_cands, is_root):
  """Multi-token widening (§5).

  new_cands: [(tokens, weight)], one greedy + up to one sample, prepended to
  node.cand_list. The first (#children + 1) entries of the list give priors (weights
  renormalised over those entries, root smoothing if root); entries whose tokens are
  not yet children are appended in list order. A token set listed twice among them is
  added once, with the prior of its first entry.
  """
  if node.cand_list is None:
    raise ValueError("add_children_multi: node has no stored candidate list")
  node.cand_list = [(tuple(t), w) for t, w in new_cands] + node.cand_list
  head = node.cand_list[:len(node.children) + 1]
  priors = priors_from_weights([w for _, w in head], is_root)
  present = {c.tokens for c in node.children}
  for (tokens, _), prior in zip(head, priors):
    if tokens not in present:
      add_child(node, tokens, prior)
      present.add(tokens)


# -------------------------------------------------------------------------------- backup


def cosine(x, y):
  """Cosine similarity of two vectors [E]: x.y / max(|x| |y|, 1e-8)."""
  dot = sum(a * b for a, b in zip(x, y))
  norms = math.sqrt(sum(a * a for a in x)) * math.sqrt(sum(b * b for b in y))
  return dot / max(norms, COSINE_EPS)


def path_to_root(node, root):
  """[node, parent, ..., root]; raises ValueError when root is not an ancestor of node."""
  path = [node]
  while path[-1] is not root:
    if path[-1].parent is None:
      raise ValueError("backup: root is not an ancestor of the node")
    path.append(path[-1].parent)
  return path


def backup(node, root, v, node_embeddings, sim_threshold=0.95, sim_weight=0.2):
  """Backs value v up from `node` to `root` with similarity sharing (§6).

  node_embeddings: the embedding [E] each non-root node on the path receives (the
    embedding of its tokens and everything below them on this path, rollout included),
    as a dict keyed by id(node) or a callable node -> embedding.
  Leaf to root: n += 1, fn += 1; a non-root node folds its new embedding into emb as a
  running mean over fn, then every embedded sibling s with cos(emb, s.emb) >=
  sim_threshold gets w = sim_weight * cos: s.q = (s.q s.n + w v) / (s.n + w), s.n += w
  (a sibling without embedding has cosine 0 in the original and never passes a
  positive threshold). Then, because the original's recursion updates the parent first,
  from root to leaf: q += (v - q) / n, and each non-root q widens [root.minq, root.maxq].
  """
  def embedding_of(x):
    if callable(node_embeddings):
      return node_embeddings(x)
    if id(x) not in node_embeddings:
      raise ValueError(f"backup: no embedding given for the path node {x.tokens}")
    return node_embeddings[id(x)]

  path = path_to_root(node, root)
  for x in path:
    x.n += 1
    x.fn += 1
    if x is root:
      continue
    new = list(embedding_of(x))
    if x.emb is None:
      x.emb = new
    else:
      if len(new) != len(x.emb):
        raise ValueError(f"embedding size {len(new)} != stored size {len(x.emb)}")
      x.emb = [(old * (x.fn - 1) + e) / x.fn for old, e in zip(x.emb, new)]
    for sibling in x.parent.children:
      if sibling is x or sibling.emb is None:
        continue
      similarity = cosine(x.emb, sibling.emb)
      if similarity >= sim_threshold:
        w = sim_weight * similarity
        sibling.q = (sibling.q * sibling.n + w * v) / (sibling.n + w)
        sibling.n += w
  for x in reversed(path):
    x.q += (v - x.q) / x.n
    if x is not root:
      root.minq = min(root.minq, x.q)
      root.maxq = max(root.maxq, x.q)


# ------------------------------------------------------------------ selection and commit


def select_path(root, state, c_puct=2.0, widen=None):
  """Walks from root to a leaf by PUCT (§3).

  state: [T] the text at the root. widen(node, text): called at every node with
  children before choosing among them (the driver's widening step, §5).
  Returns (leaf, text at the leaf).
  """
  node, text = root, tuple(state)
  while node.children:
    if widen is not None:
      widen(node, text)
    node = select_child(node, root, c_puct)
    text = text + node.tokens
  return node, text


def commit(root):
  """Moves to the most visited child (§2): detached, minq/maxq carried, its children's
  priors smoothed. Visit statistics of the subtree are kept."""
  move = most_visited_child(root)
  if move is None:
    raise ValueError("commit: root has no children")
  move.parent = None
  move.minq, move.maxq = root.minq, root.maxq
  if move.children:
    for child, prior in zip(move.children, smooth_priors([c.p for c in move.children])):
      child.p = prior
  return move


# ------------------------------------------------------------------ sampling and proposals


def top_tokens(logits, k):
  """The k largest logits as [(id, logit)], descending logit, ties: lower id first."""
  order = sorted(range(len(logits)), key=lambda v: (-logits[v], v))
  return [(v, logits[v]) for v in order[:k]]


def softmax(values, temperature):
  """softmax(values / temperature) in float64, [m] -> [m]."""
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  top = max(values)
  exps = [math.exp((x - top) / temperature) for x in values]
  total = sum(exps)
  return [e / total for e in exps]


def top_k_probs(logits, k, temperature):
  """{id: probability} of the softmax over the top-k logits at `temperature`."""
  top = top_tokens(logits, k)
  return dict(zip([v for v, _ in top], softmax([logit for _, logit in top], temperature)))


def greedy_token(logits):
  """argmax of the logits; ties: lowest id (engine.md §3)."""
  return max(range(len(logits)), key=lambda v: logits[v])


def sample_token(logits, allowed, temperature, seed, counters):
  """Gumbel-max draw over the allowed ids (engine.md §3).

  argmax over v in allowed of float32(z_v) / float32(t) + gumbel_py(uniform_py(seed,
  *counters, v)), computed in float32; allowed ids are scanned in increasing order and
  the first maximum wins. counters: (purpose, a, b, c).
  """
  t = np.float32(temperature)
  best, best_score = None, None
  for v in sorted(allowed):
    score = np.float32(logits[v]) / t + gumbel_py(uniform_py(seed, *counters, v))
    if best_score is None or score > best_score:
      best, best_score = v, score
  return best


def propose_one_token(logits, k=10, keep=20, temperature=1.0):
  """One-token proposal (§3, len == 1).

  logits: [V] at the leaf. Returns (candidates, stored_top): candidates are the top-k
  tokens with non-zero softmax probability at `temperature` (adv: 2) as
  [((id,), prob)] in ascending id (the original's np.where over the vocabulary);
  stored_top is the top-`keep` [(id, raw logit)] kept for widening (widening needs at
  most max_children of them).
  """
  top = top_tokens(logits, k)
  probs = softmax([logit for _, logit in top], temperature)
  candidates = sorted(((v,), p) for (v, _), p in zip(top, probs) if p > 0)
  return candidates, top_tokens(logits, keep)


def clamp_greedy_weight(greedy, sampled):
  """g = max(min(g, sum(sampled)), max(sampled) + min(sampled)) (§3); g if none kept."""
  if not sampled:
    return greedy
  greedy = min(greedy, sum(sampled))
  return max(greedy, max(sampled) + min(sampled))


def _greedy_sequence(lm, text, length, temperature, sample_top):
  """Argmax continuation of `length` tokens; weight = product of its top-k softmax probs."""
  text, tokens, weight = tuple(text), [], 1.0
  for _ in range(length):
    logits = lm.next_logits(text)
    token = greedy_token(logits)
    weight *= top_k_probs(logits, sample_top, temperature)[token]
    tokens.append(token)
    text = text + (token,)
  return tuple(tokens), weight


def _sampled_sequence(lm, text, length, temperature, sample_top, seed, counters_at):
  """Sampled continuation of `length` tokens from the top-k softmax at `temperature`.

  counters_at(t) -> (purpose, a, b, c) for position t (0-based within the sequence).
  Returns (tokens, weight = product of the per-step probabilities).
  """
  text, tokens, weight = tuple(text), [], 1.0
  for t in range(length):
    logits = lm.next_logits(text)
    probs = top_k_probs(logits, sample_top, temperature)
    token = sample_token(logits, probs.keys(), temperature, seed, counters_at(t))
    weight *= probs[token]
    tokens.append(token)
    text = text + (token,)
  return tuple(tokens), weight


def propose_sequences(lm, text, length, k, attempts, temperature, sample_top, seed,
                      counters_at):
  """Multi-token proposal (§3, len > 1): the greedy sequence plus up to k-1 samples.

  attempts: number of sampling attempts (k-1, adv 2k-1); stops once k-1 distinct
  samples are kept; a sample equal to the greedy sequence or to a kept one is dropped.
  counters_at(j, t) -> (purpose, a, b, c) for attempt j (1-based) at position t.
  Returns [(tokens, weight)], greedy first then kept samples in attempt order, with the
  greedy weight clamped (clamp_greedy_weight).
  """
  greedy, greedy_weight = _greedy_sequence(lm, text, length, temperature, sample_top)
  kept = []
  for j in range(1, attempts + 1):
    if len(kept) == k - 1:
      break
    tokens, weight = _sampled_sequence(lm, text, length, temperature, sample_top, seed,
                                       lambda t, j=j: counters_at(j, t))
    if tokens != greedy and all(tokens != other for other, _ in kept):
      kept.append((tokens, weight))
  greedy_weight = clamp_greedy_weight(greedy_weight, [w for _, w in kept])
  return [(greedy, greedy_weight)] + kept


def path_embeddings(lm, leaf, root, full_ids, rollout_len):
  """The embedding each non-root node on the leaf-to-root path receives in backup (§6).

  full_ids: [T] the leaf's text followed by the rollout (rollout_len tokens). Walking
  up, path_len starts at rollout_len and grows by each node's token count; the node
  gets lm.embed(full_ids, path_len), the embedding of its tokens and everything below.
  Returns {id(node): [E]}.
  """
  embeddings, path_len = {}, rollout_len
  for node in path_to_root(leaf, root)[:-1]:
    path_len += len(node.tokens)
    embeddings[id(node)] = lm.embed(full_ids, path_len)
  return embeddings


# ---------------------------------------------------------------------- the whole driver


@dataclasses.dataclass(frozen=True)
class Settings:
  """Search constants (§2-§6); defaults are HH's. adv: min_T=5, propose_temperature=2,
  sample_attempts_factor=2, terminal_eos_in_path=True (adv's terminal test looks for EOS
  in the whole text). truth: min_T=16, rollout_stops_at_clause_end=False,
  rollout_stops_at_path_eos=True (truth checks the text for EOS before each sample; HH
  and adv stop only after sampling EOS), search_stops_at_turn_marker=False (truth never
  looks for a turn marker while searching)."""
  max_T: int = 50
  min_T: int = 6
  value_threshold: float = 0.8
  c_puct: float = 2.0
  num_candidates: int = 10
  sample_top: int = 15
  max_children: int = 20
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
  similarity: bool = True
  seed: int = 0

  def __post_init__(self):
    for name in ("max_T", "num_candidates", "sample_top", "max_children", "maxlen",
                 "sample_attempts_factor"):
      if getattr(self, name) < 1:
        raise ValueError(f"Settings.{name} must be >= 1, got {getattr(self, name)}")
    if self.min_T < 0:
      raise ValueError(f"Settings.min_T must be >= 0, got {self.min_T}")
    if self.propose_temperature <= 0:
      raise ValueError(
          f"Settings.propose_temperature must be > 0, got {self.propose_temperature}")


class LanguageModel(Protocol):
  vocab_size: int
  eos_id: int

  def next_logits(self, ids: tuple) -> list:
    """Logits [V] for the token after ids."""

  def embed(self, ids: tuple, k: int) -> list:
    """Embedding [E] of the text made of the last k tokens of ids."""

  def is_clause_end(self, token: int) -> bool:
    """Whether a text ending with this token ends with , . ? : ; or a newline."""

  def has_turn_marker(self, ids: tuple, prompt_len: int) -> bool:
    """Whether ids[prompt_len:] holds a new turn marker."""

  def turn_marker_start(self, ids: tuple, prompt_len: int) -> int:
    """Index in ids where the first new turn marker starts (len(ids) when none)."""


class Judge(Protocol):

  def value(self, ids: tuple, prompt_len: int) -> float:
    """Verdict v in {-1, 0, +1} on the conversation ids (prompt first)."""


class ChildStats(NamedTuple):
  tokens: tuple
  n: float
  fn: int
  q: float
  p: float


class CommitStats(NamedTuple):
  """One outer step: simulations run, whether the early-stop rule ended it, and the
  root's children (in child order) just before the commit."""
  simulations: int
  early_stop: bool
  children: list


@dataclasses.dataclass
class Result:
  """committed: token sets in commit order; tokens: the generated ids (prompt
  excluded); stop_reason: 'no_children' | 'turn_marker' | 'maxlen' | 'eos';
  commits: one CommitStats per committed set; simulations: total over the generation;
  judge_calls: distinct judged sequences (verdicts are memoised); early_stops: outer
  steps ended by the early-stop rule."""
  committed: list
  tokens: tuple
  stop_reason: str
  commits: list
  simulations: int
  judge_calls: int
  early_stops: int


class _Search:
  """One generation's search state: the models, the simulation counter and the
  verdict memo."""

  def __init__(self, prompt, lm, judge, settings):
    self.prompt_len = len(prompt)
    self.lm, self.judge, self.settings = lm, judge, settings
    self.sim = 0
    self.verdicts = {}

  def simulate(self, root, state):
    """One simulation (§3): select (widening on the way), evaluate, expand, back up."""
    leaf, text = select_path(root, state, self.settings.c_puct, widen=self.widen)
    v, rollout = self.evaluate(text)
    if not self.is_terminal(leaf, text):
      self.expand(leaf, text)
    embeddings = path_embeddings(self.lm, leaf, root, text + rollout, len(rollout))
    threshold = self.settings.sim_threshold if self.settings.similarity else math.inf
    backup(leaf, root, v, embeddings, threshold, self.settings.sim_weight)
    self.sim += 1

  def is_terminal(self, node, text):
    """No expansion past maxlen, EOS in the node's tokens (adv: anywhere in the
    generated text), or a new turn marker (not for truth)."""
    s = self.settings
    eos_in = text[self.prompt_len:] if s.terminal_eos_in_path else node.tokens
    return (len(text) > s.maxlen or self.lm.eos_id in eos_in or
            (s.search_stops_at_turn_marker and
             self.lm.has_turn_marker(text, self.prompt_len)))

  def rollout(self, text):
    """Rollout (§4.1) from text; returns the sampled tokens.

    Before each sample it stops when the text is longer than maxlen, a new turn marker
    appeared (unless truth), the text ends a clause (unless truth), or (truth only) the
    generated part holds EOS; HH and adv stop right after sampling EOS. Each token is
    drawn from the full softmax at temperature 1 with counters (ROLLOUT, sim, 0, t),
    t = 0-based index within the rollout.
    """
    s = self.settings
    text, sampled = tuple(text), []
    all_ids = range(self.lm.vocab_size)
    while True:
      if (len(text) > s.maxlen or
          (s.rollout_stops_at_path_eos and self.lm.eos_id in text[self.prompt_len:]) or
          (s.search_stops_at_turn_marker and
           self.lm.has_turn_marker(text, self.prompt_len)) or
          (s.rollout_stops_at_clause_end and self.lm.is_clause_end(text[-1]))):
        return tuple(sampled)
      counters = (ROLLOUT, self.sim, 0, len(sampled))
      token = sample_token(self.lm.next_logits(text), all_ids, 1.0, s.seed, counters)
      sampled.append(token)
      text = text + (token,)
      if token == self.lm.eos_id and not s.rollout_stops_at_path_eos:
        return tuple(sampled)

  def evaluate(self, text):
    """Self-evaluation (§4): (v, rollout tokens); verdicts memoised by judged ids."""
    rollout = self.rollout(text)
    # The judged conversation is cut before a new turn marker (§4.2).
    ids = (text + rollout)[:self.lm.turn_marker_start(text + rollout, self.prompt_len)]
    # The original memoises by the judged text; a fake model has no text, so the key
    # here is the judged id sequence.
    if ids not in self.verdicts:
      self.verdicts[ids] = float(self.judge.value(ids, self.prompt_len))
    return self.verdicts[ids], rollout

  def expand(self, leaf, text):
    """Proposes token sets of length token_set_len(leaf.step) and expands the leaf."""
    s = self.settings
    length = token_set_len(leaf.step)
    is_root = leaf.parent is None
    if length == 1:
      candidates, stored_top = propose_one_token(self.lm.next_logits(text),
                                                 s.num_candidates, s.max_children,
                                                 s.propose_temperature)
      expand(leaf, candidates, is_root, stored_top)
    else:
      k = s.num_candidates
      candidates = propose_sequences(
          self.lm, text, length, k, s.sample_attempts_factor * k - 1,
          s.propose_temperature, s.sample_top, s.seed,
          lambda j, t: (PROPOSE, self.sim, j, t))
      expand(leaf, candidates, is_root)

  def widen(self, node, text):
    """§5: add a child when all children look alike and all look bad."""
    s = self.settings
    if not should_add_child(node, s.max_children, s.var_scale):
      return
    is_root = node.parent is None
    if len(node.children[0].tokens) == 1:
      add_children_one_token(node, is_root)
      return
    # Widening counters (engine.md §3) carry no attempt index: with more than one
    # attempt (adv) every attempt repeats the first draw and is dropped as a duplicate.
    k = 2
    new_cands = propose_sequences(
        self.lm, text, token_set_len(node.step), k, s.sample_attempts_factor * k - 1,
        s.propose_temperature, s.sample_top, s.seed,
        lambda j, t: (WIDEN, self.sim, node.step * 64 + j, t))
    add_children_multi(node, new_cands, is_root)


def rain_generate(prompt, lm, judge, settings):
  """RAIN's outer loop (§2) on prompt [T] ids; returns a Result."""
  if not prompt:
    raise ValueError("rain_generate: empty prompt")
  s = settings
  search = _Search(prompt, lm, judge, s)
  state, root, done_visits = tuple(prompt), Node(step=0), 0
  committed, commits, early_stops = [], [], 0
  while True:
    simulations, early_stop = 0, False
    for _ in range(done_visits, max(s.max_T, done_visits + MIN_SEARCHES_PER_COMMIT)):
      search.simulate(root, state)
      simulations += 1
      child = most_visited_child(root)
      if child is not None and child.fn > s.min_T and child.q > s.value_threshold:
        early_stop = True
        break
    early_stops += early_stop
    if not root.children:
      stop_reason = "no_children"
      break
    children = [ChildStats(c.tokens, c.n, c.fn, c.q, c.p) for c in root.children]
    commits.append(CommitStats(simulations, early_stop, children))
    root = commit(root)
    state += root.tokens
    committed.append(root.tokens)
    done_visits = root.fn
    if s.search_stops_at_turn_marker and lm.has_turn_marker(state, len(prompt)):
      stop_reason = "turn_marker"
    elif len(state) > s.maxlen:
      stop_reason = "maxlen"
    elif lm.eos_id in root.tokens:
      stop_reason = "eos"
    else:
      continue
    break
  return Result(committed, state[len(prompt):], stop_reason, commits, search.sim,
                len(search.verdicts), early_stops)


def vanilla_greedy(prompt, lm, max_new_tokens, settings):
  """Greedy decoding of prompt [T] (the vanilla baseline, §7); returns the new ids.

  Stops after EOS, once a new turn marker appears, at maxlen tokens in all, or after
  max_new_tokens; the stopping token is kept (cutting text is the task's business).
  """
  text = tuple(prompt)
  while len(text) - len(prompt) < max_new_tokens and len(text) < settings.maxlen:
    text = text + (greedy_token(lm.next_logits(text)),)
    if text[-1] == lm.eos_id or lm.has_turn_marker(text, len(prompt)):
      break
  return text[len(prompt):]
