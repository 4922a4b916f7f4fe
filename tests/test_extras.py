"""rain_jax.extras.require: the package of an extra, or an ImportError naming the extra."""
import importlib
import sys
import types

import pytest

from rain_jax import extras


def test_require_returns_the_module():
  assert extras.require('json', 'eval') is importlib.import_module('json')
  assert extras.require('os.path', 'eval') is sys.modules['os.path']


def _hide(monkeypatch, *names):
  """Makes `import name` fail for each of `names` as for a package that is not installed
  (a None entry in sys.modules: the import raises ModuleNotFoundError)."""
  for name in names:
    monkeypatch.setitem(sys.modules, name, None)


def test_missing_package_names_the_extra(monkeypatch):
  _hide(monkeypatch, 'vaderSentiment', 'vaderSentiment.vaderSentiment')
  with pytest.raises(ImportError) as info:
    extras.require('vaderSentiment.vaderSentiment', 'eval')
  assert str(info.value) == "vaderSentiment is not installed: pip install -e '.[eval]'"
  assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_package_name_differs_from_module(monkeypatch):
  _hide(monkeypatch, 'rouge_score')
  with pytest.raises(ImportError, match=r"^rouge-score is not installed: pip install -e "
                                        r"'\.\[eval\]'$"):
    extras.require('rouge_score', 'eval', package='rouge-score')


def test_really_missing_module():
  """No monkeypatching: a module that no installed package provides."""
  with pytest.raises(ImportError, match=r"rain_jax_no_such_package is not installed: "
                                        r"pip install -e '\.\[report\]'"):
    extras.require('rain_jax_no_such_package.sub', 'report')


def test_other_import_errors_pass_through(monkeypatch):
  """A package that is installed but fails to import something else is not 'missing'."""
  monkeypatch.setitem(sys.modules, 'rain_jax_fake_pkg', types.ModuleType('rain_jax_fake_pkg'))
  real = importlib.import_module

  def import_module(module_name, package=None):
    if module_name == 'rain_jax_fake_pkg.sub':
      raise ModuleNotFoundError("No module named 'some_dependency'", name='some_dependency')
    return real(module_name, package)

  monkeypatch.setattr(extras.importlib, 'import_module', import_module)
  with pytest.raises(ModuleNotFoundError, match='some_dependency'):
    extras.require('rain_jax_fake_pkg.sub', 'eval')


def test_sentiment_without_vader_names_the_eval_extra(monkeypatch):
  from rain_jax.evaluation import sentiment
  sentiment._analyzer.cache_clear()
  _hide(monkeypatch, 'vaderSentiment', 'vaderSentiment.vaderSentiment')
  try:
    with pytest.raises(ImportError, match=r"vaderSentiment is not installed: "
                                          r"pip install -e '\.\[eval\]'"):
      sentiment.compound('a fine film')
  finally:
    sentiment._analyzer.cache_clear()
