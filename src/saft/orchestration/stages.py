"""The stretches of DAG both pipelines share: how a run begins, evaluates and ends.

Each takes the components ``c``, the pipeline's ``on(task, name, display=None)`` (which
applies the cluster policy) and ``p``, the pipeline function's parameters as a namespace.
"""

from __future__ import annotations

from kfp import dsl


def begin(c, on, p, run_name: str):
    """start-run -> data-version (never cached) -> world; returns the world task.

    The world output records the version, and every data-reading task takes it (or
    prepare's output, made from it), so the version is in every such cache key. It is not
    a parameter of the tasks inside loops: kfp.local replaces a task output that enters a
    ParallelFor with the loop item.
    """
    start = on(c.start_run(params_json=p.params_json, run_name=run_name, tracking=p.tracking), "start_run")
    version = on(c.data_version(data_root=p.data_root, data_rev=p.data_rev, data_repo=p.data_repo,
                                expected=p.data_version, pool_per_class=p.pool_per_class,
                                test_per_class=p.test_per_class, tracking=p.tracking).after(start), "data_version")
    return on(c.world(data_root=p.data_root, data_version=version.output, pool_per_class=p.pool_per_class,
                      test_per_class=p.test_per_class), "world")


def check_protocol(c, on, p, world, *, register_enabled=None):
    """The protocol task (``saft run``'s check before the first training); train after it."""
    return on(c.protocol(world=world.outputs["world"], suite=p.suite, eval_data_root=p.eval_data_root,
                         subset=p.data_subset, dataset=p.dataset, data_root=p.data_root,
                         register_enabled=p.register_enabled if register_enabled is None else register_enabled,
                         gate=p.register_gate), "protocol")


def evaluate_suite(c, on, p, world, deltas, parallelism: int):
    """One evaluate task per suite dataset (zero-shot, unless ``p.zeroshot`` is off, and every delta), then collect;
    returns collect."""
    names = on(c.suite_datasets(world=world.outputs["world"], suite=p.suite, data_root=p.eval_data_root,
                                subset=p.data_subset), "suite_datasets")
    zeroshot = {"zeroshot": p.zeroshot} if hasattr(p, "zeroshot") else {}
    with dsl.ParallelFor(names.output, parallelism=parallelism) as name:
        part = on(c.evaluate(model=p.model, world=world.outputs["world"], suite=p.suite, data_root=p.eval_data_root,
                             dataset=name, alphas=p.alphas, batch_size=p.eval_batch_size, device=p.device,
                             tracking=p.tracking, deltas=deltas, loader=p.loader, reference=p.eval_reference,
                             template_set=p.eval_templates, allow_train_overlap=p.eval_allow_train_overlap,
                             subset=p.data_subset, **zeroshot), "evaluate")
    return on(c.collect(parts=dsl.Collected(part.outputs["metrics"]), deltas=deltas, tracking=p.tracking), "collect")


def register_and_finish(c, on, p, results, deltas, *, data=None, deploy_image: str = "") -> None:
    """If register_enabled: register (+ deploy on promotion, given ``deploy_image``) then finish-run; else finish-run.

    ``deploy_image`` is the compiled pipeline's image: the predictor runs it unless the deploy settings name another.
    """
    with dsl.If(p.register_enabled == True, "register-enabled"):  # noqa: E712 (a pipeline condition)
        reg = on(c.register(model=p.model, results=results, deltas=deltas, method="saft",
                            model_name=p.register_model_name, promote=p.promote, ood_tolerance=p.ood_tolerance,
                            id_tolerance=p.id_tolerance, baseline=p.register_baseline, tracking=p.tracking,
                            gate=p.register_gate, hm_tolerance=p.hm_tolerance,
                            **({"data": data} if data is not None else {})), "register")
        if deploy_image:
            with dsl.If(reg.outputs["verdict"] == "promoted", "promoted"):
                with dsl.If(p.deploy_enabled == True, "deploy-enabled"):  # noqa: E712 (a pipeline condition)
                    on(c.deploy(decision=reg.outputs["decision"], model_name=p.register_model_name,
                                settings=p.deploy_settings, image=deploy_image, tracking=p.tracking), "deploy")
        on(c.finish_run(tracking=p.tracking, results=results, decision=reg.outputs["decision"]), "finish_run",
           "finish-run")
    with dsl.Else():  # the compiler names this second task finish-run-2: shown as what it is
        on(c.finish_run(tracking=p.tracking, results=results), "finish_run", "finish-run")


__all__ = ["begin", "check_protocol", "evaluate_suite", "register_and_finish"]
