"""runner's metrics against torchmetrics' definitions (acc micro; f1, precision, recall macro
over the classes present in targets or predictions; mse, mae), on random batches that leave
some classes out, predict others never, and arrive in pieces."""

import pytest
import torch
from torchmetrics.classification import (
    MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score, MulticlassPrecision, MulticlassRecall,
)
from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError

from runner.metrics import ConfusionMatrix, eval_metrics


@pytest.mark.parametrize("seed", range(6))
def test_classification_scores_equal_torchmetrics(seed):
    generator = torch.Generator().manual_seed(seed)
    classes = 7
    reference = {
        "acc": MulticlassAccuracy(classes, average="micro"), "f1": MulticlassF1Score(classes, average="macro"),
        "precision": MulticlassPrecision(classes, average="macro"), "recall": MulticlassRecall(classes, average="macro"),
    }
    ours, matrix, their_matrix = eval_metrics(classes), ConfusionMatrix(classes), MulticlassConfusionMatrix(classes)
    for _ in range(4):
        labels = torch.randint(0, classes - 2, (37,), generator=generator)  # classes 5 and 6 never occur as targets
        scores = torch.randn(37, classes, generator=generator)
        scores[:, 6] -= 100  # and class 6 is never predicted: absent from both, left out of the macro mean
        scores[labels == 0, 0] += 1.5 * (seed % 2)  # sometimes mostly right
        ours.update(scores, labels)
        matrix.update(scores, labels)
        their_matrix.update(scores, labels)
        for metric in reference.values():
            metric.update(scores, labels)
    computed = ours.compute()
    for name, metric in reference.items():
        assert float(computed[name]) == pytest.approx(float(metric.compute()), abs=1e-6), name
    assert torch.equal(matrix.compute(), their_matrix.compute())


def test_regression_scores_equal_torchmetrics():
    generator = torch.Generator().manual_seed(0)
    ours, mse, mae = eval_metrics(1, "regression"), MeanSquaredError(), MeanAbsoluteError()
    predictions, targets = [], []
    for _ in range(3):
        prediction, target = torch.randn(50, generator=generator), torch.randn(50, generator=generator)
        ours.update(prediction, target)
        mse.update(prediction, target), mae.update(prediction, target)
        predictions.append(prediction), targets.append(target)
    computed = ours.compute()
    assert float(computed["mse"]) == pytest.approx(float(mse.compute()), rel=1e-6)
    assert float(computed["mae"]) == pytest.approx(float(mae.compute()), rel=1e-6)
    error, target = torch.cat(predictions) - torch.cat(targets), torch.cat(targets)
    assert float(computed["rel_l2"]) == pytest.approx(float(error.norm() / target.norm()), rel=1e-6)


def test_nothing_seen_gives_zeros_and_a_label_out_of_range_is_refused():
    empty = eval_metrics(3).compute()
    assert all(float(value) == 0.0 for value in empty.values())
    with pytest.raises(ValueError, match=r"labels run from 0 to 3, outside 0..2"):
        eval_metrics(3).update(torch.randn(2, 3), torch.tensor([0, 3]))
