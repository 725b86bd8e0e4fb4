import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ldm_jax.training import sharding as shd
from ldm_jax.training import toy
from ldm_jax.types import ConfigError


def test_mesh_shape_resolution_and_errors():
    assert shd.mesh_shape(-1, 1, 8) == (8, 1)
    assert shd.mesh_shape(-1, 2, 8) == (4, 2)
    assert shd.mesh_shape(2, -1, 8) == (2, 4)
    with pytest.raises(ConfigError, match="only 8 exist"):
        shd.mesh_shape(4, 4, 8)
    with pytest.raises(ConfigError, match="do not split"):
        shd.mesh_shape(-1, 3, 8)
    with pytest.raises(ConfigError, match="at most one -1"):
        shd.mesh_shape(-1, -1, 8)
    mesh = shd.make_mesh({"data": -1, "fsdp": 2})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}


def test_rules_validation():
    assert shd.logical_rules([["batch", ["data", "fsdp"]], ["embed", "fsdp"]]) == (
        ("batch", ("data", "fsdp")), ("embed", "fsdp"))
    with pytest.raises(ConfigError, match="unknown mesh axis 'model'"):
        shd.logical_rules((("embed", "model"),))
    with pytest.raises(ConfigError, match="expected"):
        shd.logical_rules(("embed",))


def test_shape_first_init_shards_by_logical_names():
    mesh = shd.make_mesh({"data": 4, "fsdp": 2})
    task = toy.make_task(toy.toy_config())
    abstract, shardings = shd.sharded_abstract(task.init, mesh, shd.DEFAULT_RULES, jax.random.PRNGKey(0))
    # conv1 kernel (3, 3, 3, 8): conv_out=8 splits over fsdp=2; conv2 (3, 3, 8, 3): 3 does not divide -> replicated
    assert shardings["conv1"]["kernel"].spec == P(None, None, None, "fsdp")
    assert shardings["conv2"]["kernel"].spec == P()
    assert abstract["conv1"]["kernel"].sharding == shardings["conv1"]["kernel"]
    params, _ = shd.create_sharded(task.init, mesh, shd.DEFAULT_RULES, jax.random.PRNGKey(0))
    kernel = params["conv1"]["kernel"]
    assert not isinstance(kernel, nn.Partitioned) and kernel.sharding.spec == P(None, None, None, "fsdp")
    assert {s.data.shape for s in kernel.addressable_shards} == {(3, 3, 3, 4)}
    plain = nn.meta.unbox(task.init(jax.random.PRNGKey(0)))
    np.testing.assert_allclose(np.asarray(kernel), np.asarray(plain["conv1"]["kernel"]), rtol=1e-6)


def test_global_batch_layout_and_size_checks():
    mesh = shd.make_mesh({"data": 4, "fsdp": 2})
    local = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
    arr = shd.global_batch(local, mesh)["x"]
    assert arr.shape == (16, 3) and arr.sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(arr), local["x"])
    assert {s.data.shape for s in arr.addressable_shards} == {(2, 3)}
    shd.check_batch_size(16, mesh, grad_accum=2)
    with pytest.raises(ConfigError, match="multiple of 8 devices x train.grad_accum=4"):
        shd.check_batch_size(16, mesh, grad_accum=4)
    placed = shd.place({"w": nn.Partitioned(jnp.ones((4, 8)), ("embed", None))}, mesh, shd.DEFAULT_RULES)
    assert placed["w"].sharding.spec == P("fsdp")


def test_distributed_not_initialized_on_a_plain_machine(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert shd.maybe_initialize_distributed() is False
    assert jax.process_count() == 1


def test_distributed_arguments_reach_jax_distributed(monkeypatch):
    seen = {}
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen.update(kw))
    assert shd.maybe_initialize_distributed("127.0.0.1:1234", 1, 0, local_device_ids=(2, 3)) is True
    assert seen == dict(coordinator_address="127.0.0.1:1234", num_processes=1, process_id=0, local_device_ids=[2, 3])
