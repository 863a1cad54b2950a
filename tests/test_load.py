"""model.load: one loader for weights from any source; the tokenizer and chat template a checkpoint records
(in its layout, or for old checkpoints in the run's config.yaml); parameters of any source onto a run's mesh."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import yaml
from flax import nnx

from data.tokenizer import load_tokenizer, store_tokenizer
from model import get_preset, init_model, make_mesh
from model.checkpoint import CheckpointError, restore_target
from model.hf import WeightsError, save_hf
from model.load import (
    checkpoint_layout,
    convert_to_checkpoint,
    legacy_metadata,
    load_model,
    load_params,
    source_kind,
)

OLD = os.path.join(os.path.dirname(__file__), "data", "old_checkpoint")  # written before the layout named a tokenizer
CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(path, simple=True, separator="/"): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_same(got, want: dict[str, np.ndarray]) -> None:
    got = _flat(got)
    assert sorted(got) == sorted(want)
    for path, value in want.items():
        np.testing.assert_array_equal(got[path], value, err_msg=path)


def test_a_checkpoint_records_its_tokenizer_and_chat_template(tmp_path):
    """convert_to_checkpoint writes them into the layout of the step; load_model reads them back, whatever a
    config.yaml beside it says, and an explicit tokenizer overrides the recorded one."""
    loaded = load_model(preset="tiny", vocab_size=300, tokenizer="cl100k_base")
    assert loaded.tokenizer == "cl100k_base" and loaded.chat_template is None and loaded.config.vocab_size == 300
    want = _flat(loaded.params)
    convert_to_checkpoint(dataclasses.replace(loaded, chat_template=CHATML), str(tmp_path / "run"))
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump({"tokenizer": "o200k_base", "chat_template": "x"}))

    layout = checkpoint_layout(str(tmp_path / "run"))
    assert (layout["tokenizer"], layout["chat_template"]) == ("cl100k_base", CHATML)
    for path in (tmp_path / "run", tmp_path / "run" / "checkpoints"):
        again = load_model(checkpoint=str(path))
        assert (again.tokenizer, again.chat_template, again.config) == ("cl100k_base", CHATML, loaded.config)
        _assert_same(again.params, want)
    assert load_model(checkpoint=str(tmp_path / "run"), tokenizer="o200k_base").tokenizer == "o200k_base"
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        convert_to_checkpoint(loaded, str(tmp_path / "run"))


@pytest.mark.parametrize("run, tokenizer, template", [
    ({"converted_from": "/models/x.gguf", "model": {"vocab_size": 32}, "tokenizer": "/models/x.gguf",
      "chat_template": CHATML}, "/models/x.gguf", CHATML),
    ({"run_dir": "runs/x", "data": {"store": "/stores/stdlib", "val_fraction": 0.1}, "model": {}}, "/stores/stdlib",
     None),
    (None, None, None),
], ids=["converted", "trained", "no-config"])
def test_old_checkpoints_read_the_tokenizer_from_config_yaml(tmp_path, run, tokenizer, template):
    """A checkpoint written before layouts named a tokenizer: the config.yaml beside it, in either of the two
    shapes that were written (a converted model's, a training run's), or nothing when there is none."""
    shutil.copytree(OLD, tmp_path / "old")
    if run is not None:
        (tmp_path / "old" / "config.yaml").write_text(yaml.safe_dump(run))
    assert "tokenizer" not in checkpoint_layout(str(tmp_path / "old"))
    assert legacy_metadata(str(tmp_path / "old" / "checkpoints")) == (tokenizer, template)
    loaded = load_model(checkpoint=str(tmp_path / "old"))
    assert (loaded.tokenizer, loaded.chat_template) == (tokenizer, template)
    with np.load(os.path.join(OLD, "params.npz")) as saved:
        _assert_same(loaded.params, dict(saved))


def test_load_tokenizer_reads_a_token_store(tmp_path):
    """A training run's checkpoint names its token store; load_tokenizer gives the store's tokenizer."""
    from data.pipeline import tokenizer_record
    from data.store import StoreWriter

    tokenizer = load_tokenizer("cl100k_base")
    with StoreWriter(tmp_path / "store", 8, {"tokenizer": tokenizer_record(tokenizer, None)}) as writer:
        writer.append(np.ones((2, 9), np.int32), np.ones((2, 9), np.int32))
    from_store = load_tokenizer(str(tmp_path / "store"))
    assert from_store.source == "cl100k_base" and from_store.file_hash == tokenizer.file_hash
    assert store_tokenizer(str(tmp_path / "store")).encode("hello world") == tokenizer.encode("hello world")


def test_text_generation_does_not_import_the_dataset_libraries(tmp_path):
    """`meshlm generate` and `meshlm serve` load a model and its tokenizer (here a token store's) without
    `datasets` or `datasketch`, which only preparing data needs."""
    from data.pipeline import tokenizer_record
    from data.store import StoreWriter

    metadata = {"tokenizer": tokenizer_record(load_tokenizer("cl100k_base"), None)}
    with StoreWriter(tmp_path / "store", 8, metadata) as writer:
        writer.append(np.ones((1, 9), np.int32), np.ones((1, 9), np.int32))
    code = (
        "import sys\n"
        "import meshlm, infer.generate, infer.server, model.load\n"
        "from data.tokenizer import load_tokenizer\n"
        f"load_tokenizer({str(tmp_path / 'store')!r}).encode('x')\n"
        "print(sorted(m for m in ('datasets', 'datasketch') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_weights_of_any_source_start_a_run_on_its_mesh(tmp_path):
    """load_params (train.init_from): a Hugging Face directory's parameters, checked against the run's model,
    cast to its dtypes and placed with its shardings on an 8-device mesh; another model is refused by name."""
    config = get_preset("tiny").replace(vocab_size=96)
    params = nnx.to_pure_dict(nnx.state(init_model(config, seed=5)))
    save_hf(str(tmp_path / "hf"), config, params)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    target, layout = restore_target(config.replace(param_dtype="bfloat16"), mesh)
    placed = load_params(str(tmp_path / "hf"), target, layout)
    for got, want in zip(jax.tree.leaves(placed), jax.tree.leaves(target), strict=True):
        assert got.dtype == want.dtype and got.sharding == want.sharding
    want = {path: np.asarray(value.astype(jax.numpy.bfloat16)) for path, value in _flat(params).items()}
    _assert_same(placed, want)

    other_target, other_layout = restore_target(config.replace(d_ff=192), mesh)
    with pytest.raises(CheckpointError, match="d_ff"):
        load_params(str(tmp_path / "hf"), other_target, other_layout)


def test_a_source_string_names_its_kind(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert source_kind("x/model.gguf") == {"gguf": "x/model.gguf"}
    assert source_kind(str(tmp_path / "hf")) == {"hf": str(tmp_path / "hf")}
    assert source_kind("smollm2-135m") == {"model": "smollm2-135m"}
    assert source_kind(str(tmp_path / "run")) == {"checkpoint": str(tmp_path / "run")}
    with pytest.raises(WeightsError, match="exactly one"):
        load_model(gguf="a.gguf", hf="b")
    with pytest.raises(WeightsError, match="vocabulary size"):
        load_model(preset="tiny")
