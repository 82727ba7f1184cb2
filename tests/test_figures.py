"""The reporting figures read on their own: titles say what and on which data, chance lines, labelled axes,
legends that name every mark, and no label drawn over another."""

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from vit_pipelines.evaluation.analysis import plot_position_similarity
from vit_pipelines.evaluation.finetune import plot_finetune
from vit_pipelines.evaluation.plots import plot_curves, plot_fewshot
from vit_pipelines.evaluation.vtab import plot_vtab

HISTORY = [
    {"step": 2, "loss": 2.0, "accuracy": 0.2, "lr": 0.1, "seconds": 1.0, "images": 8},
    {"step": 4, "loss": 1.5, "accuracy": 0.4, "lr": 0.1, "seconds": 1.0, "images": 8},
    {"step": 4, "minival_accuracy": 0.35, "fewshot_digits_5shot_accuracy": 0.5},
]


def legend_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def drawn(fig: Figure) -> Figure:
    FigureCanvasAgg(fig).draw()  # lays the text out, so its extents are the saved PNG's
    return fig


def test_training_curves_show_chance_under_the_accuracies():
    fig = plot_curves(HISTORY, "Ti/4 pretraining, 60 minival images", chance=0.025)
    loss, accuracy, fewshot = fig.axes
    assert loss.get_title() == "Ti/4 pretraining, 60 minival images" and loss.get_ylabel() == "loss"
    assert legend_texts(accuracy) == ["train (running)", "minival", "chance 0.025"]
    assert [line.get_ydata()[0] for line in accuracy.lines][-1] == 0.025
    assert legend_texts(fewshot) == ["digits 5shot"] and "shots" in fewshot.get_title()


def fewshot_result(classes: int) -> dict:
    point = {"mean": 0.5, "ci95": 0.1, "per_seed": [0.4, 0.5, 0.6]}
    return {"pretrained": {"1": point, "5": point}, "random_init": {"1": point, "5": point},
            "num_classes": classes, "test_images": 600}  # fmt: skip


def test_fewshot_panels_say_what_the_error_bars_are():
    fig = plot_fewshot({"digits": fewshot_result(10), "counting": fewshot_result(6)})
    assert "95% confidence interval over seeds" in fig._suptitle.get_text()
    assert "mean of 3 seeds" in fig._suptitle.get_text()
    digits = fig.axes[0]
    assert digits.get_title() == "digits (10 classes, 600 test images)"
    assert legend_texts(digits) == ["chance", "pretrained ViT", "same ViT, random init"]
    assert [t.get_text() for t in digits.get_xticklabels()] == ["1", "5"]  # no minor 2x10^0 labels


def test_finetune_figure_names_the_chosen_learning_rate_and_the_test_lines():
    result = {
        "history": HISTORY[:2] + [{"step": 4, "test_accuracy": 0.3}],
        "dev_accuracy": {0.01: 0.4, 0.03: 0.3},
        "chosen_lr": 0.01,
        "num_classes": 10,
        "test_accuracy": 0.35,
        "test_accuracy_ema": 0.36,
        "from_scratch": {"test_accuracy": 0.2, "test_accuracy_ema": 0.21},
    }
    fig = drawn(plot_finetune({"digits": result}))
    bars = fig.axes[1]
    assert bars.get_ylabel() == "accuracy" and "dev" in bars.get_title() and "test" in bars.get_title()
    assert legend_texts(bars) == [
        "test raw 0.350",
        "test EMA 0.360",
        "from scratch, test 0.210",
        "dev accuracy",
        "dev, chosen LR",
    ]
    assert [t.get_text() for t in bars.get_xticklabels()] == ["0.01", "0.03"]
    orange = to_rgba("tab:orange")
    assert [(p.get_height(), p.get_facecolor() == orange) for p in bars.patches] == [
        (0.3, False),
        (0.4, True),
    ]
    legend = bars.get_legend().get_window_extent()
    assert not any(legend.overlaps(p.get_window_extent()) for p in bars.patches)  # the legend sits above 1.0


def test_vtab_figure_says_which_suite_and_keeps_its_labels_apart():
    results = {
        "digits": {"group": "natural", "test_accuracy": 0.97, "train_images": 1000},
        "pets": {"group": "natural", "test_accuracy": 0.9, "train_images": 1000},
        "textures": {"group": "specialized", "test_accuracy": 0.5, "train_images": 1000},
        "counting": {"group": "structured", "test_accuracy": None, "error": "boom", "train_images": 1000},
    }
    summary = {"group_mean": {"natural": 0.935, "specialized": 0.5}, "mean": 0.79}
    fig = drawn(plot_vtab(results, summary, "VTAB-1k protocol on the embedded offline stand-in suite"))
    title = fig._suptitle.get_text()
    assert title.startswith(
        "VTAB-1k protocol on the embedded offline stand-in suite: mean test accuracy 0.790"
    )
    assert "1000 training images per task" in title
    natural, _, structured = fig.axes
    assert legend_texts(natural) == ["group mean 0.935", "test accuracy"]
    labels = [t for t in natural.texts]
    assert [t.get_text() for t in labels] == ["0.97", "0.90"]
    assert [t.get_text() for t in structured.texts] == ["failed"]
    legend = natural.get_legend().get_window_extent()
    mean_line = natural.transData.transform([[0, 0.935]])[0][1]
    for label in labels:
        box = label.get_window_extent()
        assert not box.overlaps(legend) and not (box.y0 <= mean_line <= box.y1)
    assert not legend.overlaps(natural.patches[0].get_window_extent())  # the legend sits above the bars


def test_position_similarity_numbers_rows_and_columns():
    similarity = np.random.default_rng(0).uniform(-1, 1, (3, 4, 3, 4))
    fig = drawn(plot_position_similarity(similarity))
    grid = np.array(fig.axes[:12]).reshape(3, 4)
    assert [ax.get_xlabel() for ax in grid[-1]] == ["1", "2", "3", "4"]
    assert [ax.get_ylabel() for ax in grid[:, 0]] == ["1", "2", "3"]
    assert (
        fig._supxlabel.get_text() == "input patch column" and fig._supylabel.get_text() == "input patch row"
    )
    assert fig.axes[-1].get_ylabel() == "cosine similarity"  # the colour bar
    width = fig.get_window_extent().width
    assert fig._suptitle.get_window_extent().width < width  # the title fits the figure
