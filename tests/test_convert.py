"""models/convert.py: HF safetensors / GGUF -> params -> orbax, against torch state dicts."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import gguf
import jax
import numpy as np
import pytest
import safetensors.numpy
from flax import traverse_util

from models import convert, llama, presets
from models.llama import unstack_layers

# Our leaf (layer-relative) -> HF state-dict suffix, and whether HF stores it transposed.
HF_LAYER_NAMES = {
    ("attn_norm", "scale"): ("input_layernorm.weight", False),
    ("attn", "wq", "kernel"): ("self_attn.q_proj.weight", True),
    ("attn", "wk", "kernel"): ("self_attn.k_proj.weight", True),
    ("attn", "wv", "kernel"): ("self_attn.v_proj.weight", True),
    ("attn", "wo", "kernel"): ("self_attn.o_proj.weight", True),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", False),
    ("mlp", "w_gate", "kernel"): ("mlp.gate_proj.weight", True),
    ("mlp", "w_up", "kernel"): ("mlp.up_proj.weight", True),
    ("mlp", "w_down", "kernel"): ("mlp.down_proj.weight", True),
}


def expected_unrolled_params(model):
  """Our unrolled parameter tree, built by hand from a torch LlamaForCausalLM's weights."""
  state = {k: v.float().numpy() for k, v in model.state_dict().items()}
  expected = {("embed", "embedding"): state["model.embed_tokens.weight"],
              ("final_norm", "scale"): state["model.norm.weight"]}
  if not model.config.tie_word_embeddings:
    expected[("lm_head",)] = state["lm_head.weight"].T
  for i in range(model.config.num_hidden_layers):
    for path, (suffix, transposed) in HF_LAYER_NAMES.items():
      weight = state[f"model.layers.{i}.{suffix}"]
      expected[(f"layers_{i}",) + path] = weight.T if transposed else weight
  return expected


def assert_params_equal(params, expected_flat, num_layers):
  if "layers" in params:
    params = unstack_layers(params, num_layers)
  flat = traverse_util.flatten_dict(params)
  assert set(flat) == set(expected_flat)
  for path, value in expected_flat.items():
    np.testing.assert_array_equal(np.asarray(flat[path], np.float32), value,
                                  err_msg="/".join(path))


@pytest.mark.parametrize("torch_dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("scan_layers", [True, False])
def test_hf_to_params_to_orbax_round_trip(tiny_hf_checkpoint, tmp_path, torch_dtype,
                                          scan_layers):
  hf_dir, model = tiny_hf_checkpoint(num_heads=4, num_kv_heads=2, torch_dtype=torch_dtype)
  stored_dtype = convert.read_safetensors_header(hf_dir / "model.safetensors")[
      "model.embed_tokens.weight"][0]
  assert stored_dtype.name == torch_dtype
  dtype = "bfloat16" if torch_dtype == "bfloat16" else "float32"
  config, params = convert.load_hf_dir(hf_dir, dtype=dtype, scan_layers=scan_layers)
  assert (config.num_heads, config.num_kv_heads, config.rope_theta) == (4, 2, 1000.0)
  assert jax.tree.leaves(params)[0].dtype == np.dtype(dtype)
  expected = expected_unrolled_params(model)
  assert_params_equal(params, expected, config.num_layers)

  checkpoint = tmp_path / "ckpt"
  convert.save_params(params, checkpoint, config)
  assert sorted(os.listdir(tmp_path)) == ["ckpt", hf_dir.name]
  assert convert.load_config(checkpoint) == config
  restored = convert.restore_params(checkpoint)
  assert_params_equal(restored, expected, config.num_layers)
  as_f32 = convert.restore_params(checkpoint, config.replace(param_dtype="float32"))
  assert jax.tree.leaves(as_f32)[0].dtype == np.float32
  assert_params_equal(as_f32, expected, config.num_layers)


def test_sharded_checkpoint_with_index(tiny_hf_checkpoint):
  hf_dir, model = tiny_hf_checkpoint(tie=True, max_shard_size="20KB")
  assert len(list(hf_dir.glob("*.safetensors"))) > 1
  assert (hf_dir / "model.safetensors.index.json").exists()
  config, params = convert.load_hf_dir(hf_dir)
  assert config.tie_embeddings and "lm_head" not in params
  assert_params_equal(params, expected_unrolled_params(model), config.num_layers)


def test_config_from_hf_reads_v4_and_v5_layouts():
  common = dict(model_type="llama", vocab_size=32000, hidden_size=4096,
                intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                rms_norm_eps=1e-5, max_position_embeddings=4096)
  v4 = convert.config_from_hf(dict(common, rope_theta=10000.0, rope_scaling=None,
                                   tie_word_embeddings=False))
  v5 = convert.config_from_hf(dict(common, rope_parameters={"rope_theta": 10000.0,
                                                             "rope_type": "default"}))
  assert v4 == v5 == presets.get_preset("llama2-7b")
  with pytest.raises(ValueError, match="rope scaling"):
    convert.config_from_hf(dict(common, rope_scaling={"type": "linear", "factor": 2.0}))
  with pytest.raises(ValueError, match="model_type 'mistral'"):
    convert.config_from_hf(dict(common, model_type="mistral"))
  with pytest.raises(ValueError, match="lacks 'hidden_size'"):
    convert.config_from_hf({k: v for k, v in common.items() if k != "hidden_size"})


def test_corrupt_hf_inputs_raise_naming_the_problem(tiny_hf_checkpoint):
  hf_dir, _ = tiny_hf_checkpoint()
  shard = hf_dir / "model.safetensors"
  data = shard.read_bytes()

  shard.write_bytes(data[:-10])
  with pytest.raises(ValueError, match=r"model.safetensors: truncated safetensors file: tensor"):
    convert.load_hf_dir(hf_dir)

  shard.write_bytes(data[:4])
  with pytest.raises(ValueError, match="model.safetensors: not a safetensors file"):
    convert.load_hf_dir(hf_dir)

  shard.write_bytes(b"\xff" * 64)
  with pytest.raises(ValueError, match="model.safetensors: corrupt or truncated"):
    convert.load_hf_dir(hf_dir)

  shard.write_bytes(data)
  tensors = safetensors.numpy.load_file(shard)
  del tensors["model.layers.1.mlp.up_proj.weight"]
  safetensors.numpy.save_file(tensors, shard)
  with pytest.raises(ValueError, match="no tensor 'model.layers.1.mlp.up_proj.weight'"):
    convert.load_hf_dir(hf_dir)

  shard.write_bytes(data)
  config_path = hf_dir / "config.json"
  hf_config = json.loads(config_path.read_text())
  config_path.write_text(json.dumps(dict(hf_config, intermediate_size=40)))
  with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.layers.0.mlp.down_proj"
                                       r".weight' has shape \(32, 48\), but the config "
                                       r"implies \(32, 40\)"):
    convert.load_hf_dir(hf_dir)

  config_path.unlink()
  with pytest.raises(ValueError, match="no config.json"):
    convert.load_hf_dir(hf_dir)
  (hf_dir / "model.safetensors.index.json").write_text(
      json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
  with pytest.raises(ValueError, match="names shard 'model-00002-of-00002.safetensors', "
                                       "which is missing"):
    convert.params_from_hf_dir(hf_dir, convert.config_from_hf(hf_config))


def _save_interrupted_before_config(params, target, config, monkeypatch):
  """save_params interrupted (KeyboardInterrupt) when it comes to write config.json."""
  def interrupted(self):
    raise KeyboardInterrupt

  monkeypatch.setattr(type(config), "to_json", interrupted)
  with pytest.raises(KeyboardInterrupt):
    convert.save_params(params, target, config)
  monkeypatch.undo()


def test_interrupted_save_leaves_nothing_complete(tiny_hf_checkpoint, tmp_path, monkeypatch):
  hf_dir, _ = tiny_hf_checkpoint()
  config, params = convert.load_hf_dir(hf_dir)
  target = tmp_path / "out" / "ckpt"

  _save_interrupted_before_config(params, target, config, monkeypatch)
  assert os.listdir(tmp_path / "out") == []
  with pytest.raises(ValueError, match="not a complete rain_jax checkpoint"):
    convert.restore_params(target)

  convert.save_params(params, target, config)
  with pytest.raises(FileExistsError, match="already exists"):
    convert.save_params(params, target, config)
  with pytest.raises(ValueError, match="param embed/embedding is float32"):
    convert.save_params(params, tmp_path / "other", config.replace(param_dtype="bfloat16"))
  with pytest.raises(ValueError, match="holds a checkpoint for"):
    convert.restore_params(target, config.replace(num_layers=config.num_layers + 1))
  with pytest.raises(ValueError, match="holds a checkpoint for"):
    convert.restore_params(target, config.replace(tie_embeddings=not config.tie_embeddings))


def test_unpermute_rotary_rows_by_hand():
  # One head of dim 4, llama.cpp rows interleaved as (re0, im0, re1, im1).
  weight = np.array([[10.0], [11.0], [20.0], [21.0]])
  np.testing.assert_array_equal(convert.unpermute_rotary_rows(weight, 1),
                                [[10.0], [20.0], [11.0], [21.0]])
  two_heads = np.arange(16.0).reshape(8, 2)
  got = convert.unpermute_rotary_rows(two_heads, 2)
  np.testing.assert_array_equal(got[:4], two_heads[[0, 2, 1, 3]])
  np.testing.assert_array_equal(got[4:], two_heads[[4, 6, 5, 7]])


def llama_cpp_permute(weight, num_heads):
  """llama.cpp's convert script: HF rotate_half rows -> interleaved rotary rows."""
  rows = weight.shape[0]
  return (weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
          .swapaxes(1, 2).reshape(weight.shape))


def write_gguf_from_hf(model, path, qtype=gguf.GGMLQuantizationType.F32):
  """A llama GGUF of a torch LlamaForCausalLM, written the way llama.cpp's converter does."""
  cfg = model.config
  writer = gguf.GGUFWriter(str(path), arch="llama")
  writer.add_block_count(cfg.num_hidden_layers)
  writer.add_context_length(cfg.max_position_embeddings)
  writer.add_embedding_length(cfg.hidden_size)
  writer.add_feed_forward_length(cfg.intermediate_size)
  writer.add_head_count(cfg.num_attention_heads)
  writer.add_head_count_kv(cfg.num_key_value_heads)
  writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
  writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  writer.add_vocab_size(cfg.vocab_size)
  names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
           "output_norm.weight", "lm_head.weight": "output.weight"}
  gguf_suffix = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
                 "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
  for name, tensor in model.state_dict().items():
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
      continue
    weight = tensor.float().numpy()
    if name.startswith("model.layers."):
      _, _, layer, rest = name.split(".", 3)
      module = rest.rsplit(".", 1)[0]
      if module == "self_attn.q_proj":
        weight = llama_cpp_permute(weight, cfg.num_attention_heads)
      if module == "self_attn.k_proj":
        weight = llama_cpp_permute(weight, cfg.num_key_value_heads)
      gguf_name = f"blk.{layer}.{gguf_suffix[module]}.weight"
    else:
      gguf_name = names[name]
    if weight.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
      quantized = gguf.quants.quantize(weight, qtype)
      writer.add_tensor(gguf_name, quantized, raw_shape=quantized.shape, raw_dtype=qtype)
    else:
      writer.add_tensor(gguf_name, weight)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


@pytest.mark.parametrize("tie", [False, True])
def test_gguf_to_params_matches_hf_weights(tiny_hf_checkpoint, tmp_path, tie):
  _, model = tiny_hf_checkpoint(num_heads=4, num_kv_heads=2, tie=tie)
  path = tmp_path / "tiny.gguf"
  write_gguf_from_hf(model, path)
  config, params = convert.load_gguf(path, scan_layers=False)
  assert config == convert.config_from_hf(model.config.to_dict(), scan_layers=False)
  assert_params_equal(params, expected_unrolled_params(model), config.num_layers)
  with pytest.raises(ValueError, match="tie_embeddings"):
    convert.params_from_gguf(path, config.replace(tie_embeddings=not tie))


@pytest.mark.integration
def test_smollm2_gguf_config_is_the_preset(smollm2_gguf_path):
  metadata = convert.gguf.read_metadata(smollm2_gguf_path)
  tensors = convert.gguf.read_gguf(smollm2_gguf_path).tensors
  assert convert.config_from_gguf(metadata, tensors) == presets.get_preset("smollm2-135m")


_SHARDED_SCRIPT = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from flax import traverse_util
    from models import convert
    from models.llama import param_shapes
    hf_dir, ckpt = sys.argv[1], sys.argv[2]
    assert jax.device_count() == 4
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
    config = convert.config_from_hf(convert.read_hf_config(hf_dir))
    def spec(path, leaf):
      names = [getattr(k, "key", None) for k in path]
      if names[-1] == "kernel":
        return NamedSharding(mesh, P(None, "data", "model"))
      return NamedSharding(mesh, P(*([None] * len(leaf.shape))))
    shardings = jax.tree_util.tree_map_with_path(spec, param_shapes(config))
    params = convert.params_from_hf_dir(hf_dir, config, shardings=shardings)
    reference = convert.params_from_hf_dir(hf_dir, config)
    convert.save_params(params, ckpt, config)
    restored = convert.restore_params(ckpt, shardings=shardings)
    for tree in (params, restored):
      for got, want, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(reference),
                                     jax.tree.leaves(shardings)):
        assert got.sharding == sharding, (got.sharding, sharding)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    wq = params["layers"]["attn"]["wq"]["kernel"]
    assert wq.addressable_shards[0].data.shape == (2, 16, 16), wq.addressable_shards[0].data.shape
    print("OK")
""")


def test_sharded_load_and_restore_on_four_cpu_devices(tiny_hf_checkpoint, tmp_path):
  hf_dir, _ = tiny_hf_checkpoint(num_heads=4, num_kv_heads=4)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-c", _SHARDED_SCRIPT, str(hf_dir), str(tmp_path / "ckpt")],
      capture_output=True, text=True, env=env, timeout=300,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def run_convert_script(*args):
  script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "scripts", "convert_checkpoint.py")
  return subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                        timeout=300)


def test_convert_checkpoint_script(tiny_hf_checkpoint, tmp_path):
  hf_dir, model = tiny_hf_checkpoint(tie=True)
  output = tmp_path / "ckpt"
  result = run_convert_script(f"--hf_dir={hf_dir}", f"--output={output}", "--dtype=float32",
                              "--scan_layers=false")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"wrote {output}: " in result.stdout and "peak RSS" in result.stdout
  config = convert.load_config(output)
  assert not config.scan_layers and config.param_dtype == "float32"
  assert_params_equal(convert.restore_params(output), expected_unrolled_params(model),
                      config.num_layers)

  again = run_convert_script(f"--hf_dir={hf_dir}", f"--output={output}")
  assert again.returncode == 1 and "already exists" in again.stderr
  both = run_convert_script(f"--hf_dir={hf_dir}", "--gguf=x.gguf", f"--output={tmp_path}/b")
  assert both.returncode == 1 and "give exactly one of --hf_dir and --gguf" in both.stderr


def write_tree_checkpoint(params, directory, config):
  """A checkpoint in the older single-tree layout: one orbax tree in params/."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  os.makedirs(directory)
  with ocp.PyTreeCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(directory, "params"), params)
  with open(os.path.join(directory, "config.json"), "w") as f:
    f.write(config.to_json())


@pytest.mark.parametrize("tree_layout", [False, True])
def test_cross_layout_restore_is_exact_both_ways(tmp_path, tree_layout):
  config = presets.get_preset("tiny-gqa").replace(num_layers=2)
  unrolled = llama.init_params(config.replace(scan_layers=False), jax.random.PRNGKey(3))
  flat = {path: np.asarray(v) for path, v in traverse_util.flatten_dict(unrolled).items()}
  stacked = llama.stack_layers(unrolled, config.num_layers)
  for saved_scan, params in ((True, stacked), (False, unrolled)):
    directory = tmp_path / f"saved-scan{saved_scan}"
    saved_config = config.replace(scan_layers=saved_scan)
    if tree_layout:
      write_tree_checkpoint(params, directory, saved_config)
    else:
      convert.save_params(params, directory, saved_config)
      assert sorted(os.listdir(directory)) == ["config.json", "tensors"]
    for target_scan in (True, False):
      restored = convert.restore_params(directory, config.replace(scan_layers=target_scan))
      assert ("layers" in restored) == target_scan
      if target_scan:
        restored = llama.unstack_layers(restored, config.num_layers)
      restored = traverse_util.flatten_dict(restored)
      assert set(restored) == set(flat)
      for path, value in flat.items():
        np.testing.assert_array_equal(np.asarray(restored[path]), value, err_msg="/".join(path))


def test_incomplete_checkpoint_is_refused(tmp_path, monkeypatch):
  config = presets.get_preset("tiny-gqa").replace(num_layers=2, scan_layers=False)
  params = llama.init_params(config, jax.random.PRNGKey(0))
  good = tmp_path / "good"
  convert.save_params(params, good, config)
  assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]

  no_config = tmp_path / "no_config"
  shutil.copytree(good, no_config)
  (no_config / "config.json").unlink()
  with pytest.raises(ValueError, match="not a complete rain_jax checkpoint"):
    convert.restore_params(no_config)

  missing = tmp_path / "missing"
  shutil.copytree(good, missing)
  shutil.rmtree(missing / "tensors" / "layers_1.mlp.w_up.kernel")
  with pytest.raises(ValueError, match=r"not a complete rain_jax checkpoint: tensors/ lacks "
                                       r"\['layers_1.mlp.w_up.kernel'\]"):
    convert.restore_params(missing)

  # On gs:// a tensor folder without orbax's commit marker is not finalised; here orbax's
  # own check is made to answer as it would there.
  real = convert.ocp.utils.is_checkpoint_finalized
  monkeypatch.setattr(convert.ocp.utils, "is_checkpoint_finalized",
                      lambda path: not str(path).endswith("final_norm.scale") and real(path))
  with pytest.raises(ValueError, match="final_norm.scale was not finalised by orbax"):
    convert.restore_params(good)


def test_sharded_conversion_equals_unsharded_on_eight_devices(tiny_hf_checkpoint, tmp_path):
  hf_dir, model = tiny_hf_checkpoint(num_heads=4, num_kv_heads=2)
  expected = tmp_path / "expected.npz"
  np.savez(expected, **{"/".join(p): v for p, v in expected_unrolled_params(model).items()})
  gguf_path = tmp_path / "same.gguf"
  write_gguf_from_hf(model, gguf_path)
  report = run_e2e("mesh", hf_dir, tmp_path, expected, gguf_path)
  assert report == {"restored": 5}


def run_e2e(*args, timeout=240):
  result = subprocess.run([sys.executable, "-m", "tests.convert_e2e", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_two_process_conversion_restores_into_the_other_layout(tiny_hf_checkpoint, tmp_path):
  hf_dir, model = tiny_hf_checkpoint(num_heads=4, num_kv_heads=2)
  expected = tmp_path / "expected.npz"
  np.savez(expected, **{"/".join(p): v for p, v in expected_unrolled_params(model).items()})
  work = tmp_path / "work"
  work.mkdir()
  report = run_e2e("multiprocess", hf_dir, work, expected, "true", "1,4,2", "2,1,4")
  assert report["saved_scan_layers"] is True
  assert len(report["lines"]) == 2
  for i, line in enumerate(report["lines"]):
    assert line.startswith(f"process {i} of 2: wrote {work / 'ckpt'}: "), line
  # Both processes wrote their own shards of the embedding.
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(report["embed_files"])
  assert sorted(os.listdir(work)) == ["ckpt", "process0.log", "process1.log"]


@pytest.mark.parametrize("flags, message", [
    (["--mesh=1,2,1"], "mesh spec '1,2,1' has 2 devices in all"),
    (["--process_id=0"], "--process_id need --distributed"),
    (["--distributed"], "--distributed needs --mesh"),
    (["--distributed", "--mesh=1,1,1", "--process_id=1"],
     "--coordinator_address, --num_processes and --process_id go together"),
])
def test_convert_script_bad_flags_give_one_line(tmp_path, flags, message):
  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  (hf_dir / "config.json").write_text(json.dumps(dict(
      model_type="llama", vocab_size=8, hidden_size=8, intermediate_size=8,
      num_hidden_layers=1, num_attention_heads=2)))
  result = run_convert_script(f"--hf_dir={hf_dir}", f"--output={tmp_path}/out", *flags)
  assert result.returncode == 1, result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
  assert errors == [f"convert_checkpoint: error: {errors[0].split('error: ', 1)[1]}"], errors
  assert message in errors[0]
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "out").exists()


def test_object_store_save_is_in_place_and_marked_complete_by_config_last(tmp_path,
                                                                            monkeypatch):
  # gs:// cannot be reached here: the object-store branch (no staging folder, no rename,
  # config.json written last) runs on a local folder by answering is_remote as gs:// would.
  monkeypatch.setattr(convert, "is_remote", lambda path: True)
  config = presets.get_preset("tiny-gqa").replace(num_layers=1)
  params = llama.init_params(config, jax.random.PRNGKey(1))
  target = tmp_path / "bucket" / "ckpt"

  _save_interrupted_before_config(params, target, config, monkeypatch)
  monkeypatch.setattr(convert, "is_remote", lambda path: True)
  # Written in place: every tensor is there, but without config.json it is not complete.
  assert os.listdir(tmp_path / "bucket") == ["ckpt"]
  assert len(os.listdir(target / "tensors")) == len(convert._unrolled_paths(config))
  with pytest.raises(ValueError, match="not a complete rain_jax checkpoint"):
    convert.restore_params(target)
  with pytest.raises(FileExistsError, match="already exists"):
    convert.save_params(params, target, config)

  convert.save_params(params, tmp_path / "bucket" / "good", config)
  assert sorted(os.listdir(tmp_path / "bucket")) == ["ckpt", "good"]
  restored = convert.restore_params(tmp_path / "bucket" / "good")
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_gs_paths_without_a_gcs_backend_are_one_line_errors(tmp_path, monkeypatch):
  real = convert.importlib.util.find_spec
  monkeypatch.setattr(convert.importlib.util, "find_spec",
                      lambda name: None if name in ("gcsfs", "tensorflow") else real(name))
  with pytest.raises(ValueError, match=r"gs://bucket/ckpt: gs:// paths need the gcsfs package"):
    convert.load_config("gs://bucket/ckpt")
  assert str(convert.as_path(tmp_path)) == str(tmp_path)
