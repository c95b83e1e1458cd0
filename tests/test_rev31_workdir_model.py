"""A training workdir given where a model folder goes (models.load_pretrained("runs/x")) said only "missing
config.json"; it now says it is a workdir and where its model is (hf/) or how to export one."""

from __future__ import annotations

import json

import pytest

from jaxrl_llm import models


def test_a_workdir_for_a_model_folder_says_where_the_model_is(tmp_path):
    wd = tmp_path / "run"
    (wd / "checkpoints").mkdir(parents=True)
    with pytest.raises(models.CheckpointError, match=r"training workdir.*no hf/ export yet.*jaxrl_llm.export"):
        models.load_pretrained(str(wd))
    (wd / "hf").mkdir()
    (wd / "hf" / "config.json").write_text(json.dumps({}))
    with pytest.raises(models.CheckpointError, match=r"training workdir.*its final model is .*run/hf"):
        models.load_pretrained(str(wd))
    with pytest.raises(models.CheckpointError, match=r"missing config.json$"):
        models.load_pretrained(str(tmp_path))  # not a workdir: as before
