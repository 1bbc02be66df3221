import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from peft import PeftModel

from shared.adapters import (AdapterUpdateError, adapter_state, array_nbytes, attach_adapter, check_update,
                             expected_shapes, load_arrays, lora_config, save_adapter, to_arrays)
from shared.base_model import load_model
from shared.config import FederationConfig

CONFIG = FederationConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0)


@pytest.fixture
def adapter(tiny_base):
    return attach_adapter(load_model(str(tiny_base)), lora_config(CONFIG), seed=1)


def _perturb(model):
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.add_(torch.randn_like(parameter))


def test_adapter_state_holds_only_lora_tensors(adapter):
    state = adapter_state(adapter)
    assert state and all("lora_A" in k or "lora_B" in k for k in state)
    # two layers x (q_proj, v_proj) x (A, B)
    assert len(state) == 2 * 2 * 2


def test_arrays_round_trip_into_another_client(adapter, tiny_base):
    _perturb(adapter)
    arrays = to_arrays(adapter_state(adapter))
    receiver = attach_adapter(load_model(str(tiny_base)), lora_config(CONFIG), seed=2)
    load_arrays(receiver, arrays)
    sent, received = adapter_state(adapter), adapter_state(receiver)
    assert sent.keys() == received.keys()
    for key in sent:
        torch.testing.assert_close(sent[key], received[key], rtol=0, atol=0)
    raw = sum(t.numel() * 4 for t in sent.values())
    # what travels is .npy bytes: the raw float32 data plus a small header per tensor
    assert raw < array_nbytes(arrays) <= raw + 256 * len(sent)


def test_saved_adapter_loads_with_plain_peft(adapter, tiny_base, tmp_path):
    _perturb(adapter)
    save_adapter(adapter, tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_model(str(tiny_base)), tmp_path / "adapter")
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        torch.testing.assert_close(adapter(input_ids=ids).logits, reloaded(input_ids=ids).logits)
        base_logits = load_model(str(tiny_base))(input_ids=ids).logits
    assert not torch.allclose(base_logits, reloaded(input_ids=ids).logits)  # the adapter does something


def _arrays(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in values.items()})


@pytest.mark.parametrize("corruption, message", [
    ("nan", "contains NaN or inf"),
    ("inf", "contains NaN or inf"),
    ("shape", "shape"),
    ("missing", "missing"),
    ("extra", "unexpected"),
    ("int", "not a float type"),
    ("oversized", "over the limit"),
])
def test_hostile_updates_are_rejected(adapter, corruption, message):
    shapes = expected_shapes(adapter)
    values = {k: v.numpy() for k, v in adapter_state(adapter).items()}
    first = next(iter(values))
    if corruption == "nan":
        values[first] = values[first].copy(); values[first].flat[0] = np.nan
    elif corruption == "inf":
        values[first] = values[first].copy(); values[first].flat[-1] = np.inf
    elif corruption == "shape":
        values[first] = np.zeros((values[first].shape[0] + 1, values[first].shape[1]), np.float32)
    elif corruption == "missing":
        del values[first]
    elif corruption == "extra":
        values["base_model.model.lm_head.weight"] = np.zeros((2, 2), np.float32)
    elif corruption == "int":
        values[first] = values[first].astype(np.int32)
    limit = 100 if corruption == "oversized" else 1 << 30
    with pytest.raises(AdapterUpdateError, match=message):
        check_update(_arrays(values), shapes, limit)


def test_rejected_update_leaves_the_adapter_untouched(adapter):
    before = adapter_state(adapter)
    values = {k: v.numpy() + 1 for k, v in before.items()}
    values[next(iter(values))][0, 0] = np.nan
    with pytest.raises(AdapterUpdateError):
        load_arrays(adapter, _arrays(values))
    for key, tensor in adapter_state(adapter).items():
        torch.testing.assert_close(tensor, before[key], rtol=0, atol=0)


def test_adapter_trains_in_fp32_on_a_bf16_base(tiny_base):
    model = attach_adapter(load_model(str(tiny_base), dtype="bfloat16"), lora_config(CONFIG))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert all(p.dtype == torch.bfloat16 for p in frozen)
