import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared 2-core machine two OpenMP
    threads wait on each other's descheduling (measured 5-100x slower). Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's digits as (train, test, info): small real data that is always there."""
    from dfmu_ext.zoo.data import load_dataset

    return load_dataset("digits")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture(scope="session")
def original(digits):
    """A SmallCNN (width 8) trained 3 epochs on digits, in eval mode: the model the unlearning tests
    start from. Shared by the whole session: deep-copy it before changing it."""
    from dfmu_ext import training
    from dfmu_ext.zoo import models

    train, _, info = digits
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = models.build_model("cnn", info.in_channels, info.num_classes, info.image_size, width=8)
    training.train_model(m, train, training.TrainConfig(epochs=3, lr=0.05), progress=False)
    torch.set_num_threads(before)
    return m.eval()
