"""Converts HF safetensors or GGUF weights into a rain_jax orbax checkpoint.

  python3 scripts/convert_checkpoint.py --hf_dir=/models/llama-7b --output=/ckpt/llama-7b \
      --dtype=bfloat16
  python3 scripts/convert_checkpoint.py --gguf=model.gguf --output=/ckpt/smol --dtype=float32

On a pod, every host runs the same command with --distributed and a --mesh over all
chips (the inference partition rules, rain_jax/sharding.py); the source and the output
must be reachable from every host (a shared folder, or gs:// for the HF folder and the
output):

  python3 scripts/convert_checkpoint.py --distributed --mesh=1,-1,1 \
      --hf_dir=gs://bucket/llama-65b --output=gs://bucket/ckpt/llama-65b --dtype=bfloat16

Tensors stream one at a time: each process reads only the rows its devices hold, puts
them straight into a global array and orbax writes every process's shards, so a host
holds at most its part of one tensor; a local output appears only once complete, a
gs:// one once config.json is written (models/convert.py). Either --scan_layers restores
into either layout. Each process ends with one line: parameter count, seconds, and its
peak resident memory.
"""
import ctypes
import os
import resource
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import convert  # pylint: disable=wrong-import-position
from models import gguf  # pylint: disable=wrong-import-position
from rain_jax import distributed  # pylint: disable=wrong-import-position

PROGRAM = "convert_checkpoint"
FLAGS = flags.FLAGS
flags.DEFINE_string("hf_dir", None, "HF model directory: config.json + *.safetensors "
                    "(local, shared or gs://).")
flags.DEFINE_string("gguf", None, "A LLaMA-architecture GGUF file (local or shared).")
flags.DEFINE_string("output", None, "New checkpoint directory (must not exist; local, "
                    "shared or gs://).")
flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16", "float16"],
                  "Parameter (and default compute) dtype of the checkpoint.")
flags.DEFINE_bool("scan_layers", True,
                  "Layer layout recorded in the checkpoint's config; the checkpoint "
                  "restores into either layout (--scan_layers or --noscan_layers).")
flags.DEFINE_string("mesh", None,
                    "data,fsdp,tensor mesh over all devices of all processes (one entry "
                    "may be -1), as in rain_jax.run; parameters are sharded with the "
                    "inference partition rules. Default: the first device (single process).")
flags.DEFINE_bool("distributed", False,
                  "Join a multi-process JAX job (one process per host) before converting.")
flags.DEFINE_string("coordinator_address", None,
                    "HOST:PORT of process 0 (with --distributed; omit all three to let "
                    "JAX detect them on Cloud TPU VMs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --distributed).")
flags.DEFINE_integer("process_id", None, "This process's index (with --distributed).")


def peak_rss_mib():
  """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def return_freed_tensors_to_the_os():
  """Makes glibc serve every allocation of 1 MiB or more with its own mmap, so a freed
  tensor buffer goes back to the OS at once instead of staying in the heap (glibc's
  default raises this threshold after the first large free). On 2 processes x 4 CPU
  devices converting 551M bfloat16 parameters this lowered the peak RSS per process
  from 446 to 396 MiB (docs/measurements.md, "Issue 10"). No-op without glibc."""
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return
  m_mmap_threshold = -3  # <malloc.h> M_MMAP_THRESHOLD
  libc.mallopt(m_mmap_threshold, 1 << 20)


def check_flags(hf_dir, gguf_path, output, distributed_flag, mesh, coordinator_address,
                num_processes, process_id):
  """ValueError for flags that cannot work, before any JAX call."""
  if bool(hf_dir) == bool(gguf_path):
    raise ValueError("give exactly one of --hf_dir and --gguf")
  if not output:
    raise ValueError("--output is required")
  given = [name for name, value in (("--coordinator_address", coordinator_address),
                                    ("--num_processes", num_processes),
                                    ("--process_id", process_id)) if value is not None]
  if given and not distributed_flag:
    raise ValueError(f"{', '.join(given)} need --distributed")
  if distributed_flag and not mesh:
    raise ValueError("--distributed needs --mesh (data,fsdp,tensor over all processes' "
                     "devices), e.g. --mesh=1,-1,1")
  if distributed_flag:
    try:
      distributed.check_arguments(coordinator_address, num_processes, process_id)
    except distributed.DistributedError as e:
      raise ValueError(str(e)) from None


def convert_checkpoint(hf_dir, gguf_path, output, dtype, scan_layers, mesh=None):
  """Converts one weight source into checkpoint `output`; returns the LlamaConfig.

  mesh: a data,fsdp,tensor spec (str) over all devices, or None for the first device.
  """
  if convert.as_path(output).exists():
    raise ValueError(f"--output {output} already exists; choose a new directory")
  fmt, path = ("hf", hf_dir) if hf_dir else ("gguf", gguf_path)
  shardings = None
  if mesh:
    from models import llama  # pylint: disable=import-outside-toplevel
    from rain_jax import sharding  # pylint: disable=import-outside-toplevel
    config = convert.source_config(fmt, path, dtype=dtype, scan_layers=False)
    shardings = sharding.param_shardings(llama.param_shapes(config), sharding.make_mesh(mesh),
                                         head_dim=config.head_dim)
  return convert.convert_weights(fmt, path, output, dtype=dtype, scan_layers=scan_layers,
                                 shardings=shardings)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  start = time.time()
  try:
    check_flags(FLAGS.hf_dir, FLAGS.gguf, FLAGS.output, FLAGS.distributed, FLAGS.mesh,
                FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if FLAGS.distributed:
      distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                             FLAGS.process_id, program=PROGRAM)
  except (ValueError, distributed.DistributedError) as e:
    sys.exit(f"{PROGRAM}: error: {e}")
  return_freed_tensors_to_the_os()
  try:
    config = convert_checkpoint(FLAGS.hf_dir, FLAGS.gguf, FLAGS.output, FLAGS.dtype,
                                FLAGS.scan_layers, FLAGS.mesh)
  except (ValueError, FileExistsError, FileNotFoundError, gguf.GGUFError,
          distributed.DistributedError) as e:
    if not FLAGS.distributed:
      sys.exit(f"{PROGRAM}: error: {e}")
    distributed.fail(str(e))  # one line, the peers told; never returns
  except Exception as e:  # pylint: disable=broad-except
    if not FLAGS.distributed:
      raise
    distributed.fail(f"{type(e).__name__}: {e}")
  import jax  # pylint: disable=import-outside-toplevel
  who = (f"process {jax.process_index()} of {jax.process_count()}: "
         if jax.process_count() > 1 else "")
  print(f"{who}wrote {FLAGS.output}: {config.num_params / 1e6:.1f}M parameters, "
        f"{FLAGS.dtype}, scan_layers={FLAGS.scan_layers}, {time.time() - start:.1f} s, "
        f"peak RSS {peak_rss_mib():.0f} MiB", flush=True)
  distributed.finish()


if __name__ == "__main__":
  app.run(main)
