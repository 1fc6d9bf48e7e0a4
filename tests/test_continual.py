"""--mode=continual (experiments/continual.py) and the bundled plays by genre (data.plays)."""

import json
import os

import numpy as np
import pytest

from conftest import micro_config
from experiments import continual, data, evaluate, state as state_lib, train
from nested.errors import UserError


def tokens(ds):
  return ds.train.size + ds.val.size


def test_genres_pick_their_plays_and_add_up(cache_dir):
  config = micro_config(cache_dir)
  load = lambda genres: data.load_dataset(_with(config, genres).data)
  roman, romances, both = load("roman"), load("romances"), load("roman,romances")
  assert "roman: 4 plays" in roman.description and "romances: 4 plays" in romances.description
  # The same plays, up to the document delimiters where the splits join documents.
  assert abs(tokens(roman) + tokens(romances) - tokens(both)) <= 8
  assert tokens(both) < tokens(load(""))
  assert roman.val.size > 0                 # a genre holds out plays of its own
  with pytest.raises(UserError, match=r"'farces', not a genre of the bundled plays; choose "
                                      r"from comedies, histories"):
    load("farces")


def _with(config, genres):
  c = config.copy_and_resolve_references()
  c.data.plays = genres
  return c


def continual_config(cache_dir, phases, **overrides):
  return micro_config(cache_dir, **{"continual.phases": phases, "continual.steps": "6,6",
                                    "continual.eval_every": 3, "train.min_lr_ratio": 1.0,
                                    **overrides})


def test_continual_phases_resume_into_one_run_and_report_the_forgetting(cache_dir, tmp_path):
  config = continual_config(cache_dir, "comedies,tragedies")
  results = continual.run(config, str(tmp_path / "cl"))
  history = results["history"]
  assert list(history) == ["comedies", "tragedies"] and results["switches"] == [6, 12]
  assert [r["step"] for r in history["comedies"]] == [0, 3, 6, 9, 12]
  loss = {p: {r["step"]: r["loss"] for r in history[p]} for p in history}
  assert results["forgetting"] == {"comedies": loss["comedies"][12] - loss["comedies"][6]}
  assert results["final_loss"]["tragedies"] == loss["tragedies"][12]
  assert results["loss_after_phase"] == [loss["comedies"][6], loss["tragedies"][12]]
  with open(tmp_path / "cl" / "continual.json") as f:
    assert json.load(f)["forgetting"] == results["forgetting"]
  assert os.path.getsize(tmp_path / "cl" / "continual.png") > 10_000

  # Reference: phase one is ordinary training on the comedies alone.
  alone = _with(config, "comedies")
  alone.train.steps = 6
  ref = train.run(alone, str(tmp_path / "alone"))
  np.testing.assert_allclose(loss["comedies"][6], ref["loss"], rtol=1e-6)

  # The switch changes the data and nothing else: comedies twice = 12 steps of comedies.
  same = continual.run(continual_config(cache_dir, "comedies,comedies"), str(tmp_path / "cc"))
  longer = _with(config, "comedies")
  longer.train.update(dict(steps=12, checkpoint_every=6))
  ref12 = train.run(longer, str(tmp_path / "alone12"))
  np.testing.assert_allclose(same["history"]["comedies"][-1]["loss"], ref12["loss"], rtol=1e-6)
  assert list(same["history"]) == ["comedies"] and same["forgetting"] == {}
  assert abs(loss["comedies"][12] - ref12["loss"]) > 1e-3    # the tragedies did change it

  table = continual.markdown([results])
  assert f"| transformer | {loss['comedies'][6]:.4f} | {loss['comedies'][12]:.4f} |" in table


@pytest.mark.parametrize("overrides,message", [
    ({"continual.steps": "6"}, r"must name two or more corpora and as many positive step"),
    ({"continual.eval_every": 4}, r"eval_every=4 must divide every phase's steps"),
    ({"data.path": "corpus.txt"}, r"leave config.data.path ''")])
def test_bad_continual_settings_name_the_field(cache_dir, overrides, message):
  with pytest.raises(UserError, match=message):
    continual.phase_configs(continual_config(cache_dir, "comedies,tragedies", **overrides))


def test_eval_of_a_phase_corpus_reads_its_own_validation_plays(cache_dir):
  configs = continual.phase_configs(continual_config(cache_dir, "comedies,tragedies"))
  a, b = (state_lib.build(c) for c in configs)
  first = lambda exp: next(iter(evaluate.validation_batches(exp)))
  assert not np.array_equal(first(a), first(b))


def test_the_tuned_protocol_trains_each_model_longer_at_its_mini_protocol_rate():
  from configs import continual as continual_configs  # pylint: disable=g-import-not-at-top
  from configs.sweeps import mini_seeds  # pylint: disable=g-import-not-at-top
  for variant in continual_configs.VARIANTS:
    plain = continual_configs.get_config(variant)
    tuned = continual_configs.get_config(f"{variant},tuned")
    model = "transformer" if variant == "transformer" else "hope"
    assert plain.train.lr == 2e-3 and tuned.train.lr == mini_seeds.BEST_LR[model]
    assert tuned.model.to_dict() == plain.model.to_dict()
    ends = [p.train.steps for p in continual.phase_configs(tuned)]
    assert ends == [300, 450] and [p.train.steps for p in continual.phase_configs(plain)] == [
        100, 200]
    reference = continual_configs.get_config(f"{variant},reference")
    assert reference.continual.phases == f"comedies,{continual_configs.REFERENCE}"
    assert reference.train.lr == tuned.train.lr and reference.continual.steps == "300,150"
  with pytest.raises(ValueError, match=r"optionally followed by ',tuned' or ',reference'"):
    continual_configs.get_config("hope,long")


def test_a_phase_can_be_a_path_to_other_text(cache_dir, tmp_path):
  """The Python reference (experiments/corpora.py) as the second corpus: the phase trains and
  is evaluated on that directory, named by its last component."""
  from experiments import corpora  # pylint: disable=g-import-not-at-top
  pytest.importorskip("pydoc_data", reason="this Python ships without its help topics")
  reference = str(tmp_path / "python_reference")
  paths = corpora.write("python_reference", reference)
  assert len(paths) > 50 and "lambda" in open(os.path.join(reference, "lambda.txt")).read()
  with pytest.raises(UserError, match="is not empty"):
    corpora.write("python_reference", reference)

  config = continual_config(cache_dir, f"comedies,{reference}", **{"continual.steps": "3,3"})
  configs = continual.phase_configs(config)
  assert [(c.data.plays, c.data.path) for c in configs] == [("comedies", ""), ("", reference)]
  results = continual.run(config, str(tmp_path / "cl"))
  assert list(results["history"]) == ["comedies", "python_reference"]
  assert list(results["forgetting"]) == ["comedies"]
  plays, code = (state_lib.build(c) for c in configs)
  first = lambda exp: bytes(np.asarray(next(iter(evaluate.validation_batches(exp))))[0].tolist())
  text = "".join(open(p, encoding="utf-8").read() for p in paths).encode()
  assert first(code)[:16] in text and first(plays)[:16] not in text
