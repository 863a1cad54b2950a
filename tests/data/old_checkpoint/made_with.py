"""How this checkpoint was made, with the code of commit bbef3e1 (ModelConfig still held compute_dtype, remat,
scan_unroll and the pipeline fields): `python tests/data/old_checkpoint/made_with.py tests/data/old_checkpoint`.
Kept as a record; it does not run against the current ModelConfig."""

import os
import shutil
import sys

import jax
import numpy as np
from flax import nnx

from model.checkpoint import restore_target, save_params
from model.config import ModelConfig
from model.placement import init_model
from model.sharding import make_mesh

out = sys.argv[1]
config = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32, max_seq_len=16,
                     compute_dtype="bfloat16", remat="full", scan_unroll=2, pipeline_microbatches=2)
mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
target, layout = restore_target(config, mesh)
params = nnx.to_pure_dict(nnx.state(init_model(config, seed=3)))
shutil.rmtree(out, ignore_errors=True)
save_params(os.path.join(out, "checkpoints"), 7, params, layout)
flat = {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(v)
        for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
np.savez(os.path.join(out, "params.npz"), **flat)
print(layout["model_config"])
