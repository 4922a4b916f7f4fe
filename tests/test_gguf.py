"""models/gguf.py against the `gguf` package (llama.cpp's own Python reader/writer)."""
import shutil

import gguf
import numpy as np
import pytest

from models import gguf as our_gguf

Q = gguf.GGMLQuantizationType
V = gguf.GGUFValueType


def _write_synthetic(path, alignment=None):
  """A small GGUF written by the `gguf` package: every value type and tensor type.

  Returns {tensor name: float32 array that was quantized into the file}.
  """
  rng = np.random.default_rng(0)
  writer = gguf.GGUFWriter(str(path), arch="llama")
  if alignment is not None:
    writer.add_custom_alignment(alignment)
  writer.add_uint8("t.u8", 200)
  writer.add_int8("t.i8", -100)
  writer.add_uint16("t.u16", 60000)
  writer.add_int16("t.i16", -30000)
  writer.add_uint32("t.u32", 4_000_000_000)
  writer.add_int32("t.i32", -2_000_000_000)
  writer.add_float32("t.f32", 0.1)
  writer.add_uint64("t.u64", 2**63 + 5)
  writer.add_int64("t.i64", -(2**62))
  writer.add_float64("t.f64", 1e-300)
  writer.add_bool("t.bool", True)
  writer.add_string("t.str", "héllo ✓")
  writer.add_key_value("t.strings", ["a", "", "Ġb c", "✓"], V.ARRAY, sub_type=V.STRING)
  writer.add_key_value("t.i32s", [3, -1, 7], V.ARRAY, sub_type=V.INT32)
  writer.add_key_value("t.f32s", [0.5, -2.0], V.ARRAY, sub_type=V.FLOAT32)
  writer.add_key_value("t.bools", [True, False], V.ARRAY, sub_type=V.BOOL)
  writer.add_key_value("t.nested", [[1, 2], [3]], V.ARRAY, sub_type=V.ARRAY)
  originals = {
      "f32": rng.normal(size=(3, 5, 64)).astype(np.float32),
      "f16": rng.normal(size=(7, 32)).astype(np.float32),
      "bf16": rng.normal(size=(4, 64)).astype(np.float32),
      "q8_0": rng.normal(size=(6, 96)).astype(np.float32),
      "q4_0": rng.normal(size=(5, 64)).astype(np.float32),
      "q4_1": rng.normal(size=(3, 128)).astype(np.float32) + 0.3,
      "q5_0": rng.normal(size=(2, 32)).astype(np.float32),
  }
  qtypes = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0,
            "q4_1": Q.Q4_1, "q5_0": Q.Q5_0}
  for name, array in originals.items():
    quantized = gguf.quants.quantize(array, qtypes[name])
    if qtypes[name] in (Q.F32, Q.F16):
      writer.add_tensor(name, quantized)
    else:
      writer.add_tensor(name, quantized, raw_shape=quantized.shape, raw_dtype=qtypes[name])
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return originals


def _oracle_metadata(path):
  reader = gguf.GGUFReader(str(path))
  return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _assert_tensors_match_oracle(path, ours):
  reader = gguf.GGUFReader(str(path))
  assert [t.name for t in reader.tensors] == list(ours.tensors)
  for tensor in reader.tensors:
    info = ours.tensors[tensor.name]
    assert info.type_name == tensor.tensor_type.name
    if tensor.tensor_type == Q.Q5_0:
      continue
    expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    loaded = ours.load(tensor.name)
    assert loaded.dtype == np.float32
    assert loaded.shape == expected.shape == info.shape, tensor.name
    np.testing.assert_array_equal(loaded, expected, err_msg=tensor.name)


def test_type_table_matches_gguf_package():
  for type_id, (name, block, size) in our_gguf.GGML_TYPES.items():
    assert Q(type_id).name == name
    assert gguf.GGML_QUANT_SIZES[Q(type_id)] == (block, size)


@pytest.mark.parametrize("alignment", [None, 64])
def test_synthetic_file_matches_oracle(tmp_path, alignment):
  path = tmp_path / "synthetic.gguf"
  originals = _write_synthetic(path, alignment)
  ours = our_gguf.read_gguf(path)
  assert ours.alignment == (alignment or 32)
  metadata = dict(ours.metadata)
  assert metadata.pop("t.nested") == [[1, 2], [3]]
  oracle = _oracle_metadata(path)
  oracle.pop("t.nested")
  assert metadata == oracle
  assert metadata["t.strings"] == ["a", "", "Ġb c", "✓"]
  assert metadata["t.u64"] == 2**63 + 5 and metadata["t.bool"] is True
  assert metadata["t.f32"] == float(np.float32(0.1))
  assert ours.tensors["f32"].shape == (3, 5, 64)
  _assert_tensors_match_oracle(path, ours)
  np.testing.assert_array_equal(ours.load("f32"), originals["f32"])
  np.testing.assert_allclose(ours.load("q8_0"), originals["q8_0"], atol=0.05)
  assert our_gguf.read_metadata(path) == ours.metadata


def test_version_2_reads_like_version_3(tmp_path):
  path = tmp_path / "v2.gguf"
  _write_synthetic(path)
  data = bytearray(path.read_bytes())
  data[4:8] = (2).to_bytes(4, "little")
  path.write_bytes(bytes(data))
  ours = our_gguf.read_gguf(path)
  assert ours.version == 2
  _assert_tensors_match_oracle(path, ours)


def test_unsupported_tensor_type_names_the_type(tmp_path):
  path = tmp_path / "synthetic.gguf"
  _write_synthetic(path)
  with pytest.raises(our_gguf.GGUFError, match="'q5_0' has type Q5_0"):
    our_gguf.read_gguf(path).load("q5_0")
  with pytest.raises(KeyError, match="no tensor named 'missing'"):
    our_gguf.read_gguf(path).load("missing")


@pytest.mark.parametrize("cut", ["in_header", "in_metadata", "in_data", "last_byte"])
def test_truncated_file_raises_naming_file(tmp_path, cut):
  source = tmp_path / "synthetic.gguf"
  _write_synthetic(source)
  data = source.read_bytes()
  last = max(our_gguf.read_gguf(source).tensors.values(), key=lambda info: info.offset)
  keep = {"in_header": 10, "in_metadata": 100, "in_data": len(data) // 2,
          "last_byte": last.offset + last.nbytes - 1}[cut]
  truncated = tmp_path / "truncated.gguf"
  truncated.write_bytes(data[:keep])
  with pytest.raises(our_gguf.GGUFError, match=r"truncated.gguf: truncated"):
    our_gguf.read_gguf(truncated)


def test_not_gguf_files_raise(tmp_path):
  wrong_magic = tmp_path / "model.safetensors"
  wrong_magic.write_bytes(b"GGML" + bytes(100))
  with pytest.raises(our_gguf.GGUFError, match=r"model.safetensors: not a GGUF file \(magic"):
    our_gguf.read_gguf(wrong_magic)
  empty = tmp_path / "empty.gguf"
  empty.write_bytes(b"")
  with pytest.raises(our_gguf.GGUFError, match="empty.gguf: not a GGUF file"):
    our_gguf.read_metadata(empty)
  with pytest.raises(our_gguf.GGUFError, match="absent.gguf: GGUF file not found"):
    our_gguf.read_gguf(tmp_path / "absent.gguf")
  version_9 = tmp_path / "v9.gguf"
  version_9.write_bytes(b"GGUF" + (9).to_bytes(4, "little") + bytes(16))
  with pytest.raises(our_gguf.GGUFError, match="unsupported GGUF version 9"):
    our_gguf.read_gguf(version_9)


def test_corrupt_metadata_type_raises(tmp_path):
  path = tmp_path / "bad.gguf"
  key = b"k"
  path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little")
                   + (1).to_bytes(8, "little") + len(key).to_bytes(8, "little") + key
                   + (77).to_bytes(4, "little") + bytes(8))
  with pytest.raises(our_gguf.GGUFError, match="unknown metadata value type 77 for key 'k'"):
    our_gguf.read_gguf(path)


@pytest.mark.integration
def test_smollm2_matches_oracle(smollm2_gguf_path):
  ours = our_gguf.read_gguf(smollm2_gguf_path)
  assert ours.metadata == _oracle_metadata(smollm2_gguf_path)
  assert ours.metadata["llama.block_count"] == 30
  assert len(ours.metadata["tokenizer.ggml.tokens"]) == 49152
  assert {info.type_name for info in ours.tensors.values()} == {"F32", "Q8_0", "Q4_1"}
  _assert_tensors_match_oracle(smollm2_gguf_path, ours)


@pytest.mark.integration
def test_smollm2_truncated_tensor_data(smollm2_gguf_path, tmp_path):
  truncated = tmp_path / "smol.gguf"
  with open(smollm2_gguf_path, "rb") as source, open(truncated, "wb") as sink:
    shutil.copyfileobj(source, sink)
    sink.truncate(source.tell() - 1)
  with pytest.raises(our_gguf.GGUFError, match=r"smol.gguf: truncated GGUF file: tensor"):
    our_gguf.read_gguf(truncated)
