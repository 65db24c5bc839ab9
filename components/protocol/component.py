"""The run's protocol and the promotion gate's inputs, checked before anything trains."""

from kfp.dsl import Dataset, Input


def protocol(world: Input[Dataset], suite: str, eval_data_root: str, subset: str, dataset: str, data_root: str,
             register_enabled: bool, gate: str) -> str:
    """Fails the run, naming the setting to change, when the training cannot follow the suite's protocol.

    The rules of `saft run` (saft.orchestration.plan): a base/new suite needs subset base and the
    reverse; the ImageNet protocols train on ImageNet; with registration on, the gate must
    be able to judge the suite.

    Args:
        world: The world task's output (its suites when suite is empty).
        suite: Built-in suite name or suite YAML file; "" = the world's synthshift (synthshift-b2n with subset base).
        eval_data_root: Root the suite's datasets live under.
        subset: all, or base (base-to-new).
        dataset: The training dataset adapter.
        data_root: The training data root ("" = the world's pool).
        register_enabled: Whether the run registers a candidate.
        gate: register.gate: auto, id_ood or hm.

    Returns:
        The gate metric (id_ood or hm; "" when registration is off).
    """
    from saft.orchestration.eval_tasks import protocol_check

    return protocol_check(world.path, suite=suite, eval_data_root=eval_data_root, subset=subset, dataset=dataset,
                          data_root=data_root, register_enabled=register_enabled, gate=gate)
