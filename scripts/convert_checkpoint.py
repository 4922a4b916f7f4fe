"""Converts HF safetensors or GGUF weights into a rain_jax orbax checkpoint.

  python3 scripts/convert_checkpoint.py --hf_dir=/models/llama-7b --output=/ckpt/llama-7b \
      --dtype=bfloat16 --scan_layers=false
  python3 scripts/convert_checkpoint.py --gguf=model.gguf --output=/ckpt/smol --dtype=float32

Tensors stream one at a time from disk to the device, so host memory stays near one
tensor; the output directory appears only once complete (models/convert.py). The run
ends with one line: parameter count, seconds, and the process's peak resident memory.
"""
import os
import resource
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import convert  # pylint: disable=wrong-import-position
from models import gguf  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("hf_dir", None, "HF model directory: config.json + *.safetensors.")
flags.DEFINE_string("gguf", None, "A LLaMA-architecture GGUF file.")
flags.DEFINE_string("output", None, "New checkpoint directory (must not exist).")
flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16", "float16"],
                  "Parameter (and default compute) dtype of the checkpoint.")
flags.DEFINE_bool("scan_layers", True,
                  "Store layers stacked [L, ...] (True) or as layers_0 ... layers_{L-1}.")


def peak_rss_mib():
  """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def convert_checkpoint(hf_dir, gguf_path, output, dtype, scan_layers):
  """Loads one weight source and saves it to `output`; returns the LlamaConfig."""
  if bool(hf_dir) == bool(gguf_path):
    raise ValueError("give exactly one of --hf_dir and --gguf")
  if not output:
    raise ValueError("--output is required")
  if os.path.exists(output):
    raise ValueError(f"--output {output} already exists; choose a new directory")
  if hf_dir:
    config, params = convert.load_hf_dir(hf_dir, dtype=dtype, scan_layers=scan_layers)
  else:
    config, params = convert.load_gguf(gguf_path, dtype=dtype, scan_layers=scan_layers)
  convert.save_params(params, output, config)
  return config


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  start = time.time()
  try:
    config = convert_checkpoint(FLAGS.hf_dir, FLAGS.gguf, FLAGS.output, FLAGS.dtype,
                                FLAGS.scan_layers)
  except (ValueError, FileExistsError, gguf.GGUFError) as e:
    sys.exit(f"convert_checkpoint: error: {e}")
  print(f"wrote {FLAGS.output}: {config.num_params / 1e6:.1f}M parameters, {FLAGS.dtype}, "
        f"scan_layers={FLAGS.scan_layers}, {time.time() - start:.1f} s, "
        f"peak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
  app.run(main)
