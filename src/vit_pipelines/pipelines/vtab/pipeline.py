from functools import partial, update_wrapper

from kedro.pipeline import Pipeline, node, pipeline

from vit_pipelines.pipelines.downstream import vtab_tasks
from vit_pipelines.pipelines.vtab import nodes


def _for_task(function, task: str):
    """`function` with `task=` bound, keeping its name and docstring for kedro viz."""
    return update_wrapper(partial(function, task=task), function)


def create_pipeline(**kwargs) -> Pipeline:
    """Namespace `vtab`: a sweep per task (`vtab.sweep.<task>`), one setting chosen over all tasks, a final
    run per task (`vtab.test.<task>`), one report."""
    tasks = vtab_tasks()
    select = node(
        nodes.select_model,
        ["pretrained_model", "params:vtab"],
        "vtab_pretrained_model",
        name="select_vtab_model",
        namespace="vtab",
    )
    sweeps = [
        pipeline(
            [
                node(
                    _for_task(nodes.sweep_task, task),
                    ["vtab_pretrained_model", "params:vtab"],
                    "sweep",
                    name="sweep_settings",
                )
            ],
            namespace=f"vtab.sweep.{task}",
            inputs={"vtab_pretrained_model"},
            parameters={"params:vtab"},
        )
        for task in tasks
    ]
    choose = node(
        nodes.choose_setting,
        inputs={"params": "params:vtab", **{task: f"vtab.sweep.{task}.sweep" for task in tasks}},
        outputs="vtab_chosen_setting",
        name="choose_one_setting_for_all_tasks",
        namespace="vtab",
    )
    finals = [
        pipeline(
            [
                node(
                    _for_task(nodes.final_task, task),
                    ["vtab_pretrained_model", "params:vtab", "sweep", "vtab_chosen_setting"],
                    "result",
                    name="train_and_test",
                )
            ],
            namespace=f"vtab.test.{task}",
            inputs={
                "vtab_pretrained_model": "vtab_pretrained_model",
                "vtab_chosen_setting": "vtab_chosen_setting",
                "sweep": f"vtab.sweep.{task}.sweep",
            },
            parameters={"params:vtab"},
        )
        for task in tasks
    ]
    summary = node(
        nodes.report,
        inputs={
            "params": "params:vtab",
            "choice": "vtab_chosen_setting",
            **{task: f"vtab.test.{task}.result" for task in tasks},
        },
        outputs=["vtab_results", "vtab_plot"],
        name="report_vtab",
        namespace="vtab",
    )
    return pipeline([select, choose, summary]) + sum(sweeps, Pipeline([])) + sum(finals, Pipeline([]))
