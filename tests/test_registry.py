import pytest

from corpus.storage import Storage
from model import registry


def test_records_are_immutable_and_newest_wins(tmp_path):
    storage = Storage(str(tmp_path))
    with pytest.raises(LookupError, match="jagpt pipeline"):
        registry.newest(storage)
    first, created = registry.register(storage, {"run_id": "run-a", "step": 100, "val_loss": 5.0, "tokens_seen": 1})
    again, created_again = registry.register(storage, {"run_id": "run-a", "step": 100, "val_loss": 1.0, "tokens_seen": 1})
    assert created and not created_again and again == first  # a second registration changes nothing
    registry.register(storage, {"run_id": "run-b", "step": 7, "val_loss": 4.0, "tokens_seen": 1})
    assert [r["run_id"] for r in registry.records(storage)] == ["run-a", "run-b"]
    assert registry.newest(storage)["run_id"] == "run-b"
    assert registry.find(storage, "run-a-100")["val_loss"] == 5.0
    assert registry.find(storage, "run-a")["step"] == 100
    with pytest.raises(LookupError, match="jagpt checkpoints"):
        registry.find(storage, "run-zzz")
