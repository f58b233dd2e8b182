"""Exports load with plain peft / transformers and reproduce the trained model's logits."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from raclora_dist.checkpoint.folder import find_latest, load_checkpoint
from raclora_dist.cli import main
from raclora_dist.config import load_config
from raclora_dist.model.session import build_session
from tests.helpers import read_jsonl, tiny_config, write_config


def trained_logits(run_dir, x):
    """Logits of the trained raclora model, rebuilt from the base and the chain record."""
    cfg = load_config(run_dir / "config.yaml")
    s = build_session(cfg, source=run_dir / "base")
    s.chain.replay(load_checkpoint(find_latest(run_dir)).chain)
    s.model.eval()
    with torch.no_grad():
        return s.model(input_ids=x).logits


@pytest.mark.parametrize(("mode", "budget"), [("into_base", None), ("factored", None), ("factored", 0.1)])
def test_peft_and_merged_exports_match_the_trained_model(tmp_path, small_data, mode, budget):
    """Every mode, and a factored chain capped by its budget: the adapter is the chain the model
    computed with (recompressed as training did), not the sum of the links."""
    raclora = {"merge_mode": mode, "chain_budget": budget}
    cfg = write_config(tmp_path / "c.yaml", tiny_config(small_data, tmp_path / "run", raclora=raclora))
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "run"
    assert main(["export", str(run), "--format", "peft"]) == 0
    assert main(["export", str(run), "--format", "merged"]) == 0
    x = torch.randint(0, 256, (2, 24))
    ref = trained_logits(run, x)
    base = AutoModelForCausalLM.from_pretrained(run / "base")
    with torch.no_grad():
        base_logits = base(input_ids=x).logits
    adapter_cfg = json.loads((run / "export" / "peft" / "adapter_config.json").read_text())
    rc, caps = load_config(cfg).raclora, set()
    for spec in load_checkpoint(find_latest(run)).layer_specs():
        caps.add(rc.chain_capacity(spec.out_features, spec.in_features))
    capped = budget is not None and max(caps) < 3 * 2
    assert adapter_cfg["peft_type"] == "LORA" and adapter_cfg["r"] == (max(caps) if capped else 3 * 2)  # links x rank
    if budget is not None:
        assert capped, "the test needs a chain that the budget caps"
        links = [r for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "link"]
        assert links[-1]["discarded_energy"] > 0  # recompressed, and the price is in the record
    peft_model = PeftModel.from_pretrained(base, run / "export" / "peft").eval()
    merged = AutoModelForCausalLM.from_pretrained(run / "export" / "merged").eval()
    with torch.no_grad():
        peft_logits = peft_model(input_ids=x).logits
        merged_logits = merged(input_ids=x).logits
    assert (ref - base_logits).abs().max() > 1e-2  # the chain changed the model
    assert torch.allclose(peft_logits, ref, atol=1e-4)
    assert torch.allclose(merged_logits, ref, atol=1e-4)


def test_compressed_export_reports_discarded_energy(tmp_path, small_data):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(small_data, tmp_path / "run"))
    assert main(["train", str(cfg)]) == 0
    out = tmp_path / "small"
    assert main(["export", str(tmp_path / "run"), "--rank", "2", "--out", str(out)]) == 0
    report = json.loads((out / "raclora_export.json").read_text())
    assert report["rank"] == 2
    assert all(0.0 < d < 1.0 for d in report["discarded_energy"].values())


def _no_cpu_repack(model):
    """This tiny model's in_features (32) are below the 4-bit blocksize (64), where
    bitsandbytes' CPU repacking fails; real models are wider."""
    from raclora_dist.quant.bnb import disable_cpu_repack

    return disable_cpu_repack(model)


def test_4bit_factored_run_exports_an_adapter_that_peft_loads_onto_the_4bit_base(tmp_path, small_data):
    from transformers import BitsAndBytesConfig

    cfg = write_config(tmp_path / "c.yaml", tiny_config(small_data, tmp_path / "run", model={"quantization": "nf4"}))
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "run"
    assert main(["export", str(run), "--format", "peft"]) == 0
    assert main(["export", str(run), "--format", "merged"]) == 0
    report = json.loads((run / "export" / "peft" / "raclora_export.json").read_text())
    assert report["merge_mode"] == "factored" and report["exact_on_4bit_base"]
    x = torch.randint(0, 256, (2, 24))
    ref = trained_logits(run, x)  # our 4-bit model with the replayed chain
    qbase = AutoModelForCausalLM.from_pretrained(
        run / "base", dtype=torch.float32, quantization_config=BitsAndBytesConfig(**report["bnb_quantization_config"]))
    assert type(qbase.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    peft_model = _no_cpu_repack(PeftModel.from_pretrained(qbase, run / "export" / "peft")).eval()
    merged = AutoModelForCausalLM.from_pretrained(run / "export" / "merged").eval()
    fp_base = AutoModelForCausalLM.from_pretrained(run / "base").eval()
    with torch.no_grad():
        peft_logits = peft_model(input_ids=x).logits
        merged_logits = merged(input_ids=x).logits
        fp_logits = fp_base(input_ids=x).logits
    assert torch.allclose(peft_logits, ref, atol=1e-4), (peft_logits - ref).abs().max()
    assert torch.allclose(merged_logits, ref, atol=1e-4), (merged_logits - ref).abs().max()
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert main(["export", str(run), "--format", "merged", "--dtype", "bfloat16", "--out", str(tmp_path / "bf16")]) == 0
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto").eval()
    assert bf16.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        bf16_logits = bf16(input_ids=x).logits.float()
    assert (bf16_logits - ref).abs().max() < 0.1 * ref.abs().max()  # within bf16 rounding of the trained model
    assert (ref - fp_logits).abs().max() > 1e-2  # 4-bit base plus chain is not the fp32 base
