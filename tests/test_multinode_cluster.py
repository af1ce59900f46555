"""The two-node fixture itself: two live raylets on 127.0.0.1, each with its own resource and temp dir."""

import pytest

pytestmark = pytest.mark.multinode


def test_two_nodes_on_loopback_with_their_own_resources(two_node_cluster):
    import ray

    two_node_cluster.connect()
    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2
    assert {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}
    by_name = {name: n for n in nodes for name in ("head", "worker") if n["Resources"].get(name)}
    assert set(by_name) == {"head", "worker"}
    assert by_name["head"]["NodeID"] != by_name["worker"]["NodeID"]
    assert two_node_cluster.node_ids() == {by_name[k]["NodeID"]: k for k in by_name}

    @ray.remote(num_cpus=0)
    def where():
        return ray.get_runtime_context().get_node_id()

    for name in ("head", "worker"):
        assert ray.get(where.options(resources={name: 0.01}).remote()) == by_name[name]["NodeID"]
    dirs = {n.get_temp_dir_path() for n in two_node_cluster.nodes.values()}
    assert dirs == set(two_node_cluster.temp_dirs.values()), dirs
    print(f"\nstart-up {two_node_cluster.startup_s:.1f} s, RSS {two_node_cluster.rss_mb_after_start:.0f} MiB")
