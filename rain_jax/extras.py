"""Packages that only some entry points need, imported where used.

The core install (`pip install -e .`) runs `python -m rain_jax.run`; evaluation, reports
and the HF comparisons need packages from an extra of setup.cfg (eval, report, hf). Code
that needs one imports it with `require`, which names the extra when it is missing:

  analyzer = require('vaderSentiment.vaderSentiment', 'eval').SentimentIntensityAnalyzer()
"""
import importlib


def require(module_name: str, extra: str, package: str | None = None):
  """Imports and returns the module `module_name`, which the extra `extra` installs.

  Args:
    module_name: a module path, e.g. 'vaderSentiment.vaderSentiment' or 'torch'.
    extra: the extra of setup.cfg that installs it, e.g. 'eval'.
    package: the distribution's name where it differs from the top-level module's
      (e.g. 'rouge-score' for rouge_score); the error message names it.

  Raises:
    ImportError: the module's package is not installed; the message says which extra
      installs it: "vaderSentiment is not installed: pip install -e '.[eval]'". An
      ImportError raised for another reason (a module that the package itself imports
      is missing, a broken install) is raised as it is.
  """
  try:
    return importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    top = module_name.split('.')[0]
    if e.name is None or e.name.split('.')[0] != top:
      raise
    raise ImportError(f"{package or top} is not installed: pip install -e '.[{extra}]'",
                      name=e.name) from e
