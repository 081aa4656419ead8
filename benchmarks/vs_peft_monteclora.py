"""Audit: monte-ds's MonteCLoRA against peft's built-in variant (peft >= 0.20), on the points
where docs/math.md says implementations differ. Each row is *measured* on the installed peft,
not asserted from its source.

    python benchmarks/vs_peft_monteclora.py [--json PATH]

Runs on CPU in about a minute (the buffer-memory row allocates peft's real 4096 x 16 sampler).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile

import torch
from torch.distributions import Dirichlet, kl_divergence
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from monte_ds import MonteCLoRAConfig, get_monteclora_model, monteclora_losses
from monte_ds.monteclora.math import dirichlet_rsample, draw_bartlett, kl_dirichlet, seeded_generator


try:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import MontecloraConfig
    from peft.tuners.lora.monteclora import MontecloraSampler
except ImportError as err:  # pragma: no cover - the audit needs peft's variant
    raise SystemExit(f"peft's MonteCLoRA is not installed (peft >= 0.20 needed): {err}")

CPU = torch.device("cpu")
ALPHA = torch.tensor([0.3, 2.0, 5.0, 0.7])


def peft_sampler(n_in: int = 8, r: int = 4, n: int = 4, buffer_size: int = 1) -> MontecloraSampler:
    return MontecloraSampler(n_in, r, n, buffer_size=buffer_size, device="cpu", dtype=torch.float32)


def dirichlet_kl_rows() -> list[dict]:
    truth = kl_divergence(Dirichlet(ALPHA.double()), Dirichlet(torch.ones(4, dtype=torch.float64))).item()
    big = torch.full((4,), 1e4)
    return [
        {
            "check": f"Dirichlet KL(Dir(0.3,2,5,0.7) ‖ Dir(1)); torch.distributions gives {truth:.4f}",
            "peft": round(peft_sampler().dirichlet_kl(ALPHA).item(), 4),
            "monte-ds": round(kl_dirichlet(ALPHA, 1.0).item(), 4),
        },
        {
            "check": "Dirichlet KL finite at alpha = 1e4 (fp32)",
            "peft": bool(torch.isfinite(peft_sampler().dirichlet_kl(big)).item()),
            "monte-ds": bool(torch.isfinite(kl_dirichlet(big, 1.0)).item()),
        },
    ]


def mixture_rows(draws: int = 20000) -> list[dict]:
    """Mixture weights: a real Dirichlet has mean alpha / sum(alpha)."""
    sampler = peft_sampler()
    z = torch.randn(draws, 4, generator=torch.Generator().manual_seed(0))
    peft_pi = torch.stack([torch.softmax(sampler.dirichlet_reparameterization(ALPHA, row), -1) for row in z])
    generator = seeded_generator(CPU, 0)
    ours = torch.stack([dirichlet_rsample(ALPHA, generator) for _ in range(draws)])
    mean = ALPHA / ALPHA.sum()
    return [
        {
            "check": f"max abs(E[π] − α/Σα) over {draws} draws (Monte-Carlo SE ≈ {0.5 / math.sqrt(draws):.3f})",
            "peft": round((peft_pi.mean(0) - mean).abs().max().item(), 4),
            "monte-ds": round((ours.mean(0) - mean).abs().max().item(), 4),
        }
    ]


def covariance_rows() -> list[dict]:
    sampler = peft_sampler(r=4)
    std = torch.diag(torch.exp(sampler.std_prior.detach()))
    sigma = sampler.wishart_reparameterization(std, sampler.sampler.get()["z_wishart"])
    return [
        {
            "check": "Σ keeps its off-diagonal terms (max abs Σ_ij, i ≠ j, of one draw)",
            "peft": round((sigma - torch.diag(sigma.diag())).abs().max().item(), 4),
            "monte-ds": "full Bartlett factor (diag(sqrt v) L_B)",
        }
    ]


def buffer_rows(n_in: int = 4096, r: int = 16) -> list[dict]:
    defaults = MontecloraConfig()
    sampler = MontecloraSampler(
        n_in, r, defaults.num_samples, buffer_size=defaults.buffer_size, device="cpu", dtype=torch.float32
    )
    storages = {
        id(t.untyped_storage()): t.untyped_storage().nbytes() for s in sampler.sampler.buffer for t in s.values()
    }
    peft_mb = sum(storages.values()) / 2**20
    # monte-ds pre-draws one forward ahead, in asynchronous mode only: one layer's share of that draw.
    ahead = draw_bartlett(1, r, n_in, float(r), seeded_generator(CPU, 0), CPU)
    ours_mb = sum(tensor.untyped_storage().nbytes() for tensor in (ahead.noise, ahead.row_sq, ahead.log_det)) / 2**20
    return [
        {
            "check": f"noise buffer memory at n_in={n_in}, r={r}, defaults (MiB)",
            "peft": f"{peft_mb:.0f} per layer",
            "monte-ds": f"{ours_mb:.2f} per layer, asynchronous sampler only (the next forward's draw)",
        }
    ]


def tiny_base(tmp: str, quantization: BitsAndBytesConfig | None = None) -> LlamaForCausalLM:
    kwargs = {} if quantization is None else {"quantization_config": quantization, "device_map": "cpu"}
    return LlamaForCausalLM.from_pretrained(tmp, **kwargs)


def randomise_b(model) -> None:
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def peft_model(base):
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        monteclora_config=MontecloraConfig(num_samples=4, sample_scaler=0.5, buffer_size=4),
    )
    return get_peft_model(base, config)


def ours_model(base):
    return get_monteclora_model(
        base, MonteCLoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], sample_scaler=0.5)
    )


def quantized_rows(tmp: str, ids: torch.Tensor) -> list[dict]:
    """Does the noise reach the output on a 4-bit base? (train-mode forwards differ)"""
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    row = {"check": "noise applied on a bitsandbytes nf4 base (max abs logit difference of two train forwards)"}
    for name, build in (("peft", peft_model), ("monte-ds", ours_model)):
        model = build(tiny_base(tmp, nf4))
        randomise_b(model)
        model.train()
        with torch.no_grad():
            row[name] = round((model(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item(), 4)
    return [row]


def checkpoint_grads(build, tmp: str, ids: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    torch.manual_seed(0)
    model = build(tiny_base(tmp))
    randomise_b(model)
    if checkpointing:
        model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    out = model(input_ids=ids, labels=ids)
    loss = out.loss + (
        monteclora_losses(model)["total"] if build is ours_model else model.base_model._get_monteclora_loss()
    )
    loss.backward()
    return torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "lora_A" in n and n.endswith("weight")])


def recompute_rows(tmp: str, ids: torch.Tensor) -> list[dict]:
    row = {"check": "gradient checkpointing changes A's gradient (max abs difference; 0 = same noise in recompute)"}
    for name, build in (("peft", peft_model), ("monte-ds", ours_model)):
        plain = checkpoint_grads(build, tmp, ids, False)
        row[name] = round((plain - checkpoint_grads(build, tmp, ids, True)).abs().max().item(), 6)
    return [row]


def host_sync_rows(tmp: str, ids: torch.Tensor) -> list[dict]:
    """Count host syncs (Tensor.__bool__/item) inside the adapted layers' forwards."""
    row = {"check": "host synchronisations per adapted-layer forward (Tensor.__bool__ / .item calls)"}
    for name, build in (("peft", peft_model), ("monte-ds", ours_model)):
        model = build(tiny_base(tmp))
        model.train()
        layers = [m for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))]
        count = [0, False]
        originals = {m: getattr(torch.Tensor, m) for m in ("__bool__", "item")}

        def counting(original):
            def wrapper(self, *args, **kwargs):
                count[0] += count[1]
                return original(self, *args, **kwargs)

            return wrapper

        for layer in layers:
            layer.register_forward_pre_hook(lambda *a: count.__setitem__(1, True))
            layer.register_forward_hook(lambda *a: count.__setitem__(1, False))
        try:
            for method, original in originals.items():
                setattr(torch.Tensor, method, counting(original))
            with torch.no_grad():
                model(input_ids=ids)
        finally:
            for method, original in originals.items():
                setattr(torch.Tensor, method, original)
        row[name] = round(count[0] / len(layers), 2)
    return [row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    rows = dirichlet_kl_rows() + mixture_rows() + covariance_rows() + buffer_rows()
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(
            LlamaConfig(
                vocab_size=128,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
            )
        ).save_pretrained(tmp)
        ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
        rows += quantized_rows(tmp, ids) + recompute_rows(tmp, ids) + host_sync_rows(tmp, ids)
    print("| check | peft | monte-ds |\n|---|---|---|")
    for row in rows:
        print(f"| {row['check']} | {row['peft']} | {row['monte-ds']} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
