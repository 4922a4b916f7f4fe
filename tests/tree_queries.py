"""Queries on a search tree that only the tests need (depths, ancestor chains, paths,
a summary), written with the same array conventions as rain_jax/tree.py."""
import jax
import jax.numpy as jnp

from rain_jax import tree as T


def node_depth(tree: T.Tree, node) -> jax.Array:
  """Edges from the current root to `node` (a used slot): () int32."""
  return tree.step[node] - tree.step[tree.root]


def depths(tree: T.Tree) -> jax.Array:
  """Depth below the current root of every slot: [N] int32, -1 for unused slots."""
  return jnp.where(tree.used, tree.step - tree.step[tree.root], -1)


def ancestor_mask(tree: T.Tree, node) -> jax.Array:
  """[N] bool: `node` (() int32, a used slot) and its ancestors up to the current root."""
  n = tree.num_nodes

  def keep_climbing(carry):
    _, current, hops = carry
    return (current >= 0) & (hops < n)

  def climb(carry):
    mask, current, hops = carry
    return mask.at[current].set(True), tree.parent[current], hops + 1

  start = (jnp.zeros((n,), bool), jnp.asarray(node, jnp.int32), jnp.asarray(0))
  return jax.lax.while_loop(keep_climbing, climb, start)[0]


def path_to_root(tree: T.Tree, node, max_depth):
  """The path root -> `node`.

  Args:
    tree: the tree.
    node: () int32, a used slot.
    max_depth: D (static int), the path capacity.

  Returns:
    path: [D] int32, path[0] = root ... path[path_len - 1] = node, -1 beyond.
    path_len: () int32, depth(node) + 1. If it exceeds D, path holds only the D
      nodes nearest the root and the caller must treat the path as truncated.
  """
  path_len = node_depth(tree, node) + 1

  def climb(hop, carry):
    path, current = carry
    position = path_len - 1 - hop
    target = jnp.where((position >= 0) & (current >= 0), position, max_depth)
    path = path.at[target].set(current, mode='drop')
    return path, tree.parent[jnp.maximum(current, 0)]

  start = (jnp.full((max_depth,), -1, jnp.int32), jnp.asarray(node, jnp.int32))
  hops = jnp.minimum(path_len, tree.num_nodes)
  path, _ = jax.lax.fori_loop(0, hops, climb, start)
  return path, path_len.astype(jnp.int32)


def tree_stats(tree: T.Tree) -> dict:
  """Summary: nodes used, max depth below the current root, overflow (() int32 each)."""
  return {
      'num_used': jnp.sum(tree.used).astype(jnp.int32),
      'max_depth': jnp.max(depths(tree)).astype(jnp.int32),
      'overflow': tree.overflow,
  }
