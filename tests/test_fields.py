"""Comma-separated list fields: one parser for every config field that holds a list."""

import types

import ml_collections
import pytest

from experiments import continual, evaluate
from nested import fields
from nested.errors import UserError
from nested.models import hope


def test_lists_drop_spaces_and_empty_entries():
  assert fields.names(" comedies, tragedies,") == ("comedies", "tragedies")
  assert fields.names("") == fields.names(None) == ()
  assert fields.ints("16, 64,8192,", field="f", example="1,2") == (16, 64, 8192)
  assert fields.ints((16, 64), field="f", example="1,2") == (16, 64)
  assert fields.ints(2048, field="f", example="1,2") == (2048,)
  assert fields.names(("comedies", "tragedies")) == ("comedies", "tragedies")


@pytest.mark.parametrize("value", ["16,1 6", "16,1.5", (16, 1.5), (16, True), "16,x"])
def test_an_entry_that_is_not_a_whole_number_is_refused(value):
  with pytest.raises(UserError, match=r"f=.* must be comma-separated whole numbers"):
    fields.ints(value, field="f", example="1,2")


def test_a_list_that_is_not_whole_numbers_names_the_field_and_a_good_value():
  with pytest.raises(UserError, match=r"config.model.cms_periods='16,6x4'.*whole numbers.*"
                                      r"--config.model.cms_periods=16,64,8192"):
    hope.HopeConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=1, cms_hidden="8,8",
                    cms_periods="16,6x4")
  with pytest.raises(UserError, match=r"config.eval.lengths='128,1.5'.*128,256,512"):
    evaluate.eval_lengths(_experiment(eval={"lengths": "128,1.5"}))


def test_continual_steps_that_are_not_numbers_are_a_user_error():
  config = _config(continual={"phases": "comedies,tragedies", "steps": "150,x",
                              "eval_every": 50})
  with pytest.raises(UserError, match=r"config.continual.steps='150,x'.*"
                                      r"--config.continual.steps=150,150"):
    continual.phase_configs(config)


def _config(**sections):
  return ml_collections.ConfigDict({k: dict(v) for k, v in sections.items()})


def _experiment(**sections):
  return types.SimpleNamespace(config=_config(**sections))
