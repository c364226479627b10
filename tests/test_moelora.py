"""moelora.py against independent references: per-expert loops, hand-written LoRA, and PEFT."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import make_tiny_model
from safetensors.torch import load_file

from moelora import MoELoRAConfig, MoELoRAModel, RoutingState

NUM_TASKS = 3


def randomize_adapters(model: MoELoRAModel, seed: int = 1):
    """Give every adapter and gate tensor random non-zero values (fresh B is all zeros)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


def wrap(config: MoELoRAConfig, seed: int = 0) -> MoELoRAModel:
    model = MoELoRAModel(make_tiny_model(seed=seed), config)
    randomize_adapters(model)
    return model.eval()


def token_ids(batch: int, length: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(4, 1000, (batch, length), generator=torch.Generator().manual_seed(seed))


def hand_task_gate(model: MoELoRAModel, task_id: int) -> torch.Tensor:
    embedding = model.gate.task_embedding.weight[task_id]  # (64,)
    return torch.softmax(model.gate.proj.weight @ embedding, dim=-1)  # (E,)


@pytest.mark.parametrize("gate", ["task", "token"])
def test_fused_layer_equals_per_expert_loop(gate):
    config = MoELoRAConfig(num_tasks=NUM_TASKS, num_experts=4, rank=8, gate=gate)
    model = wrap(config)
    layer = model.base_model.model.layers[0].mlp.up_proj
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
    task_ids = torch.tensor([2, 0])

    model._route(task_ids, batch_size=2)
    fused = layer(x)

    # Reference: separate A_i, B_i and a Python loop over experts.
    expected = F.linear(x, layer.base_layer.weight)
    experts_A = [layer.lora_A[2 * i : 2 * i + 2].clone() for i in range(4)]
    experts_B = [layer.lora_B[:, 2 * i : 2 * i + 2].clone() for i in range(4)]
    for b in range(2):
        if gate == "task":
            weights = hand_task_gate(model, task_ids[b].item()).expand(5, 4)  # (T, E)
        else:
            weights = torch.softmax(x[b] @ layer.router.weight.T, dim=-1)  # (T, E)
        for i in range(4):
            update = x[b] @ experts_A[i].T @ experts_B[i].T  # (T, D_out)
            expected[b] += (32 / 8) * weights[:, i : i + 1] * update

    assert (fused - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("gate", ["task", "token"])
def test_fresh_adapter_keeps_base_logits(gate):
    ids = token_ids(2, 7)
    expected = make_tiny_model()(input_ids=ids).logits
    model = MoELoRAModel(make_tiny_model(), MoELoRAConfig(num_tasks=NUM_TASKS, gate=gate)).eval()
    logits = model(input_ids=ids, task_ids=torch.tensor([0, 2])).logits
    assert torch.equal(logits, expected)


def test_gate_rows_sum_to_one_and_follow_task():
    model = wrap(MoELoRAConfig(num_tasks=NUM_TASKS))
    weights = model.gate_weights(torch.tensor([0, 1, 0, 2]))
    assert weights.shape == (4, 8)
    assert torch.allclose(weights.sum(-1), torch.ones(4))
    assert torch.equal(weights[0], weights[2])
    assert not torch.allclose(weights[0], weights[1])
    assert torch.allclose(weights[1], hand_task_gate(model, 1))


def test_optimizer_step_changes_only_adapters():
    model = MoELoRAModel(make_tiny_model(), MoELoRAConfig(num_tasks=NUM_TASKS)).train()
    base_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter_before = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)

    ids = token_ids(2, 9)
    loss = model(input_ids=ids, labels=ids, task_ids=torch.tensor([0, 1])).loss
    loss.backward()
    optimizer.step()

    named = dict(model.named_parameters())
    assert all(torch.equal(named[n], p) for n, p in base_before.items())
    changed = [n for n, p in adapter_before.items() if not torch.equal(named[n], p)]
    assert any(n.endswith("lora_A") for n in changed)
    assert any(n.endswith("lora_B") for n in changed)
    assert "gate.proj.weight" in changed


@pytest.mark.parametrize("gate", ["task", "token"])
def test_mixed_batch_equals_each_sequence_alone(gate):
    model = wrap(MoELoRAConfig(num_tasks=NUM_TASKS, gate=gate))
    ids = token_ids(3, 6)
    task_ids = torch.tensor([2, 0, 1])
    mixed = model(input_ids=ids, task_ids=task_ids).logits
    for b in range(3):
        alone = model(input_ids=ids[b : b + 1], task_ids=task_ids[b : b + 1]).logits
        assert (mixed[b] - alone[0]).abs().max().item() <= 1e-5


def test_merge_matches_routed_and_unmerge_restores():
    model = wrap(MoELoRAConfig(num_tasks=NUM_TASKS))
    base_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    ids = token_ids(2, 6)
    task_ids = torch.tensor([1, 1])
    routed = model(input_ids=ids, task_ids=task_ids).logits

    model.merge(1)
    merged = model(input_ids=ids, task_ids=task_ids).logits
    assert (merged - routed).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="merged for task 1"):
        model(input_ids=ids, task_ids=torch.tensor([1, 2]))

    model.unmerge()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert (p - base_before[name]).abs().max().item() <= 1e-6, name


def test_one_expert_equals_hand_written_lora():
    model = wrap(MoELoRAConfig(num_tasks=NUM_TASKS, num_experts=1, rank=4, alpha=8))
    reference = make_tiny_model()

    # Hand-written LoRA: each targeted layer adds (alpha / r) * B A x through a forward hook.
    adapters = {n: (m.lora_A.detach(), m.lora_B.detach()) for n, m in
                model.adapted_layers().items()}  # fmt: skip
    for name, (lora_A, lora_B) in adapters.items():
        linear = reference.get_submodule(name)
        linear.register_forward_hook(
            lambda mod, inputs, out, A=lora_A, B=lora_B: out + 2.0 * inputs[0] @ A.T @ B.T
        )

    ids = token_ids(2, 8)
    expected = reference(input_ids=ids).logits
    logits = model(input_ids=ids, task_ids=torch.tensor([0, 2])).logits
    assert (logits - expected).abs().max().item() <= 1e-5


def test_save_and_load_into_fresh_base(tmp_path):
    model = wrap(MoELoRAConfig(num_tasks=NUM_TASKS))
    model.save_adapter(tmp_path / "adapter", task_names=["a", "b", "c"])
    ids = token_ids(2, 6)
    task_ids = torch.tensor([2, 1])
    expected = model(input_ids=ids, task_ids=task_ids).logits

    loaded = MoELoRAModel.from_pretrained(make_tiny_model(), tmp_path / "adapter").eval()
    assert torch.equal(loaded(input_ids=ids, task_ids=task_ids).logits, expected)

    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert sum(t.numel() for t in tensors.values()) == model.num_trainable_parameters()
    assert not [k for k in tensors if "base_layer" in k or "embed_tokens" in k]
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["task_names"] == ["a", "b", "c"]
    assert saved["moelora"]["num_experts"] == 8


def test_load_mismatched_adapter_names_shapes(tmp_path):
    wrap(MoELoRAConfig(num_tasks=NUM_TASKS, rank=8)).save_adapter(tmp_path / "a", ["a", "b", "c"])
    config_file = tmp_path / "a" / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    saved["moelora"]["rank"] = 16
    config_file.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"lora_A: file \(8, 64\), model \(16, 64\)"):
        MoELoRAModel.from_pretrained(make_tiny_model(), tmp_path / "a")


def test_load_adapter_with_other_targets(tmp_path):
    config = MoELoRAConfig(num_tasks=NUM_TASKS, target_modules=["q_proj", "v_proj"])
    wrap(config).save_adapter(tmp_path / "a", ["a", "b", "c"])
    config_file = tmp_path / "a" / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    saved["moelora"]["target_modules"] = ["q_proj"]
    config_file.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="v_proj"):
        MoELoRAModel.from_pretrained(make_tiny_model(), tmp_path / "a")


def test_export_task_lora_loads_in_peft(tmp_path):
    from peft import PeftModel

    model = wrap(MoELoRAConfig(num_tasks=NUM_TASKS))
    model.export_task_lora(2, tmp_path / "task2")
    ids = token_ids(2, 6)
    expected = model(input_ids=ids, task_ids=torch.tensor([2, 2])).logits

    peft_model = PeftModel.from_pretrained(make_tiny_model(), tmp_path / "task2").eval()
    logits = peft_model(input_ids=ids).logits
    assert (logits - expected).abs().max().item() <= 1e-5


def test_export_token_gate_raises(tmp_path):
    model = wrap(MoELoRAConfig(num_tasks=NUM_TASKS, gate="token"))
    with pytest.raises(ValueError, match="token gate"):
        model.export_task_lora(0, tmp_path / "x")


def test_greedy_generate_equals_merged_generate():
    model = wrap(MoELoRAConfig(num_tasks=NUM_TASKS))
    ids = token_ids(2, 5)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    for task in range(NUM_TASKS):
        task_ids = torch.full((2,), task)
        routed = model.generate(input_ids=ids, task_ids=task_ids, **kwargs)
        model.merge(task)
        merged = model.generate(input_ids=ids, **kwargs)
        model.unmerge()
        assert torch.equal(routed, merged)


def test_beam_search_rows_keep_their_task():
    model = wrap(MoELoRAConfig(num_tasks=NUM_TASKS))
    ids = token_ids(2, 5)
    kwargs = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False)
    mixed = model.generate(input_ids=ids, task_ids=torch.tensor([0, 2]), **kwargs)
    first = model.generate(input_ids=ids[:1], task_ids=torch.tensor([0]), **kwargs)
    second = model.generate(input_ids=ids[1:], task_ids=torch.tensor([2]), **kwargs)
    assert torch.equal(mixed, torch.cat([first, second]))


def test_unknown_target_lists_linear_names():
    with pytest.raises(ValueError, match=r"'down_proj', 'gate_proj', 'k_proj'"):
        MoELoRAModel(make_tiny_model(), MoELoRAConfig(num_tasks=2, target_modules=["qkv"]))


def test_target_modules_regex():
    config = MoELoRAConfig(num_tasks=2, target_modules=r".*layers\.1\.self_attn\.(q|v)_proj")
    model = MoELoRAModel(make_tiny_model(), config)
    assert model.target_names == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]


def test_rank_not_divisible_raises():
    with pytest.raises(ValueError, match="not divisible"):
        MoELoRAConfig(num_tasks=2, num_experts=3, rank=16)
    with pytest.raises(ValueError, match=r"dropout must be a probability in \[0, 1\), got 1.5"):
        MoELoRAConfig(num_tasks=2, dropout=1.5)


def test_forward_without_task_ids_raises():
    model = wrap(MoELoRAConfig(num_tasks=NUM_TASKS))
    with pytest.raises(ValueError, match="task_ids is required"):
        model(input_ids=token_ids(1, 4))


def test_shared_dropout_mask_for_same_input():
    state = RoutingState(expert_rank=2, scaling=2.0)
    dropout = nn.Dropout(0.5).train()
    x = torch.ones(4, 16)
    assert state.dropout(x, dropout) is state.dropout(x, dropout)


def test_gradient_checkpointing_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = wrap(MoELoRAConfig(num_tasks=NUM_TASKS, dropout=0.0)).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        ids = token_ids(2, 8)
        model(input_ids=ids, labels=ids, task_ids=torch.tensor([0, 2])).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, atol=1e-6), name
