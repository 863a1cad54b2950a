"""`meshlm plan --topology`: the train step compiled by the TPU compiler for TPU topologies on this CPU machine
(libtpu from PyPI, jax.experimental.topologies), its per-chip memory checked against the analytic shard sizes,
its collectives named, and an impossible plan reported as such."""

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("libtpu", reason="planning compiles for TPU topologies with libtpu: pip install -e '.[tpu]'")

from model.tpu import (  # noqa: E402
    CHIPS,
    Collective,
    PlanError,
    _groups,
    padded_bytes_bound,
    parse_topology,
    quiet_libtpu,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
quiet_libtpu()


def test_cloud_tpu_names_map_to_slice_shapes():
    assert parse_topology("v5p-8").shape == (2, 2, 1)  # v5p-N counts TensorCores: 4 chips
    assert parse_topology("v5p-128").shape == (4, 4, 4)
    assert parse_topology("v5p-512").shape == (4, 8, 8)
    assert parse_topology("v5p:8x8x8").chips == 512
    assert parse_topology("v5e-16").shape == (4, 4) and parse_topology("v5litepod-8").shape == (2, 4)
    assert parse_topology("v6e-256").shape == (16, 16)
    assert parse_topology("v5p-8", slices=2).chips == 8
    for bad, message in [("v7x-8", "unknown TPU 'v7x'"), ("v5p-7", "a multiple of 2"), ("v5e:2x2x2", "2 dimensions"),
                         ("v5e-12", "power of two"), ("tpu", "expected NAME-N")]:
        with pytest.raises(PlanError, match=message):
            parse_topology(bad)


def test_replica_groups_in_every_spelling_name_the_mesh_axes():
    """The compiler's mesh spelling, iota and explicit lists give the same [groups, size] partition ids."""
    mesh = "replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}"
    np.testing.assert_array_equal(_groups(mesh), [[0, 1, 2, 3], [4, 5, 6, 7]])
    np.testing.assert_array_equal(_groups("replica_groups=mesh['a'=2,'b'=4] {'a'}"), [[0, 4], [1, 5], [2, 6], [3, 7]])
    np.testing.assert_array_equal(_groups("replica_groups=[4,2]<=[2,4]T(1,0)"), [[0, 4], [1, 5], [2, 6], [3, 7]])
    np.testing.assert_array_equal(_groups("replica_groups={{0,1},{2,3}}, dimensions"), [[0, 1], [2, 3]])
    assert Collective("all-reduce", ("fsdp",), 1, 100.0, 4).traffic == 150.0  # 2 (n-1)/n
    assert Collective("all-gather", ("fsdp",), 1, 100.0, 4).traffic == 75.0


def test_padding_bound():
    assert padded_bytes_bound((256, 128), 4) == 256 * 128 * 4  # tile-aligned either way round
    assert padded_bytes_bound((4, 8), 4) == 128 * 8 * 4  # 8 lanes -> 128, 4 sublanes -> 8 (or the other way)
    assert padded_bytes_bound((), 4) == 4096


def _plan(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    return subprocess.run([sys.executable, "-m", "meshlm", "plan", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_v5p():
    from train.config import load_config
    from train.plan import plan_train

    config = load_config(None, ["model.preset=tiny", "train.batch_size=8", "mesh.fsdp=-1",
                                "execution.compute_dtype=bfloat16"])
    return plan_train(config, parse_topology("v5p:2x2x1"), seq_len=64)


def test_tiny_on_v5p_compiles_and_its_memory_is_the_analytic_shards_within_tile_padding(tiny_v5p):
    """The compiled arguments are the parameter, AdamW and batch shards: at least their analytic bytes, at most
    those bytes tile-padded (tiny's 4- and 8-wide dimensions pad a lot; a model with 128-wide ones does not,
    see the next test)."""
    plan, c = tiny_v5p, tiny_v5p.cost
    assert plan.mesh_shape == {"data": 1, "stage": 1, "fsdp": 4, "tensor": 1}
    assert plan.state_bytes + plan.batch_bytes <= c.argument_bytes <= plan.padded_bytes
    assert c.alias_bytes > 0.9 * plan.state_bytes  # the donated state is updated in place
    assert plan.fits and c.total_bytes < CHIPS["v5p"].hbm_bytes
    kinds = {(x.kind, x.axes) for x in c.collectives}
    assert ("all-gather", ("fsdp",)) in kinds  # fsdp gathers the weights it computes with
    assert ("reduce-scatter", ("fsdp",)) in kinds  # and scatters their gradients back onto the shards
    # the layer scan's collectives run once per layer: some collective runs at least n_layers times
    assert max(x.count for x in c.collectives) >= 2
    report = "\n".join(plan.report())
    assert "fits (" in report and "roofline step time (an estimate" in report and "bound" in report


def test_tile_aligned_model_on_v5e_matches_the_analytic_bytes_to_a_fraction_of_a_percent():
    """Every sharded dimension a multiple of 128: the compiled arguments are the analytic shards, up to the few
    KiB of tile padding of the 1-row norms and scalars."""
    from train.config import load_config
    from train.plan import plan_train

    config = load_config(None, ["model.preset=tiny", "model.d_model=256", "model.n_heads=2", "model.n_kv_heads=2",
                                "model.head_dim=128", "model.d_ff=512", "model.vocab_size=512", "train.batch_size=8",
                                "mesh.data=2", "mesh.fsdp=2"])
    plan = plan_train(config, parse_topology("v5e:2x2"), seq_len=128)
    analytic = plan.state_bytes + plan.batch_bytes
    assert analytic <= plan.cost.argument_bytes <= plan.padded_bytes
    assert plan.cost.argument_bytes - analytic < 0.01 * analytic + 64 * 1024


def test_a_large_preset_on_a_small_slice_does_not_fit_and_says_what_would_help():
    result = _plan("--topology", "v5e-8", "--preset", "llama3-70b", "--mesh", "fsdp=-1", "--batch", "8",
                   "--seq-len", "2048", "execution.compute_dtype=bfloat16")
    assert result.returncode == 0, result.stderr
    assert "does not fit" in result.stdout and "HBM" in result.stdout
    assert "to free memory:" in result.stdout
    assert "Failed to find host bounds" not in result.stderr and "TPU_WORKER_HOSTNAMES" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--topology", "v9-8", "--preset", "tiny"], "unknown TPU 'v9'"),
    (["--topology", "v5p-8", "--preset", "tiny", "--mesh", "tensor=4", "model.n_kv_heads=2"],
     "('kv_heads', size 2) does not divide by mesh axes 'tensor'"),
    (["--topology", "v5p-8", "--preset", "tiny", "--mesh", "fsdp=-1", "--slices", "2", "mesh.dcn_fsdp=3"],
     "3 slices (the dcn_* sizes' product) do not divide the 8 devices"),
    (["--preset", "tiny"], "needs --preset, --mesh and --devices (or --topology)"),
])
def test_bad_plans_are_one_line_errors(args, message):
    result = _plan(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_decode_plan_holds_the_weights_and_the_kv_cache_and_all_reduces_over_tensor():
    """`--decode`: one decode step for 8 rows over 128 cache positions, tensor-parallel over 4 v5e chips: the
    compiled arguments hold at least the analytic weight and KV-cache shards, and the attention and MLP outputs
    are all-reduced over `tensor` in every layer."""
    from infer.plan import plan_decode
    from model import get_preset
    from model.config import Execution

    config = get_preset("tiny")
    plan = plan_decode(config, Execution(compute_dtype="bfloat16"), {"tensor": 4}, parse_topology("v5e:2x2"),
                       batch=8, context=128)
    assert plan.cache_bytes == 2 * config.n_layers * 8 * (config.n_kv_heads // 4) * 128 * config.head_dim * 2
    assert plan.weight_bytes + plan.cache_bytes <= plan.cost.argument_bytes
    reduces = [x for x in plan.cost.collectives if x.kind == "all-reduce" and x.axes == ("tensor",)]
    assert sum(x.count for x in reduces) >= 2 * config.n_layers
    assert plan.time.limit in ("HBM", "ICI", "compute") and plan.tokens_per_s > 0
    assert "tokens/s for the slice" in "\n".join(plan.report())


def test_search_compiles_each_layout_apart_and_a_layout_that_cannot_work_is_a_row(tmp_path):
    """tensor 1, 2 and 4 over 4 v5e chips (remat full already, so one policy): tiny with 2 KV heads cannot split
    them 4 ways: that layout is a row with the error, the others fit and come first, best MFU first."""
    import yaml

    from train.config import load_config
    from train.plan import search, search_table

    config = load_config(None, ["model.preset=tiny", "model.n_kv_heads=2", "train.batch_size=8",
                                "execution.remat=full", "execution.compute_dtype=bfloat16"])
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    rows = search(str(path), "v5e:2x2", 1, 64, timeout=300, log=lambda *_: None)
    assert [r["layout"].split()[0] for r in rows[:2]] in (["tensor=1", "tensor=2"], ["tensor=2", "tensor=1"])
    assert rows[0]["fits"] and rows[1]["fits"] and rows[0]["mfu"] >= rows[1]["mfu"]
    assert rows[2]["layout"].startswith("tensor=4") and not rows[2]["fits"]
    assert "('kv_heads', size 2) does not divide by mesh axes 'tensor'" in rows[2]["error"]
    assert len(search_table(rows)) == 4


def test_two_slices_put_data_on_the_data_center_network():
    """`--slices 2` with no dcn_* axis in the mesh: dcn_data=2; the gradients' reduction over `data` crosses
    the slices (DCN), the fsdp gathers stay inside each slice (ICI)."""
    from train.config import load_config
    from train.plan import plan_train

    config = load_config(None, ["model.preset=tiny", "train.batch_size=16", "mesh.fsdp=-1",
                                "execution.compute_dtype=bfloat16"])
    plan = plan_train(config, parse_topology("v5p:2x2x1", slices=2), seq_len=64)
    assert plan.mesh_shape == {"data": 2, "stage": 1, "fsdp": 4, "tensor": 1}
    found = plan.cost.collectives
    assert any(x.dcn and "data" in x.axes for x in found)
    assert all(not x.dcn for x in found if x.kind == "all-gather")
    assert plan.time.dcn_s > 0


def test_search_candidates_cover_tensor_sizes_dcn_axes_remat_and_microbatches():
    from train.config import load_config
    from train.plan import candidates

    config = load_config(None, ["model.preset=tiny", "train.batch_size=16"])  # remat none
    found = candidates(config, parse_topology("v5p-8", slices=2), microbatches=(1, 4))
    assert len(found) == 3 * 2 * 2 * 2  # tensor 1/2/4 (4 chips a slice) x dcn data/fsdp x remat none/full x 2
    assert ["mesh.tensor=4", "mesh.dcn_fsdp=2", "execution.remat=full", "train.microbatches=4"] == [
        o for o in found[-1] if o.split("=")[0] in ("mesh.tensor", "mesh.dcn_fsdp", "execution.remat",
                                                     "train.microbatches")]
