"""The training loop with a stand-in engine: what it reports, whatever the engine."""

from pathlib import Path

import numpy as np
import pytest

from edge_trady.core.selection import CandidateLayer, ChannelSampler
from edge_trady.device.data import MINUS_ONE_TO_ONE, ImageDataset
from edge_trady.device.loop import TrainConfig, train
from edge_trady.device.progress import Progress


class _Forgetful:
    """Predicts the label hidden in pixel (0, 0) before training, a wrong one after it."""

    name = "forgetful"

    def __init__(self) -> None:
        self.trained = False

    def set_selection(self, selection) -> None:
        pass

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> tuple[float, int]:
        self.trained = True
        return 1.0, 0

    def predict(self, x: np.ndarray) -> np.ndarray:
        label = np.rint((x[:, 0, 0, 0] + 1) * 127.5).astype(int) % 4
        return np.eye(4, dtype=np.float32)[(label + self.trained) % 4]

    def save_state(self, directory: Path) -> None:
        pass

    def load_state(self, directory: Path) -> None:
        pass

    def weights_finite(self) -> bool:
        return True


def _data() -> ImageDataset:
    labels = np.arange(16) % 4
    pixels = np.zeros((16, 4, 4, 3), np.uint8)
    pixels[:, 0, 0, 0] = labels
    return ImageDataset(pixels, labels, ["a", "b", "c", "d"], MINUS_ONE_TO_ONE, "test")


def test_accuracy_below_its_starting_point_is_said_plainly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sampler = ChannelSampler("classifier-only", [CandidateLayer("l", 4, 1.0)], None, seed=0)
    engine = _Forgetful()
    result = train(engine, sampler, _data(), _data(), TrainConfig(2, 8), tmp_path, Progress())
    assert result.initial_val_acc == 1.0 and [e["val_acc"] for e in result.epochs] == [0.0, 0.0]
    err = capsys.readouterr().err
    assert err.count("warning: validation accuracy fell below its starting point (1.0000 -> 0.0000)") == 2


def test_eval_every_validates_only_when_due_and_after_the_last_epoch(tmp_path: Path) -> None:
    sampler = ChannelSampler("classifier-only", [CandidateLayer("l", 4, 1.0)], None, seed=0)
    config = TrainConfig(5, 8, eval_every=2)
    epochs = train(_Forgetful(), sampler, _data(), _data(), config, tmp_path, Progress(quiet=True)).epochs
    assert [e["val_acc"] is not None for e in epochs] == [False, True, False, True, True]
