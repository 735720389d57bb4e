"""Run under torchrun by test_zero.py: for ZeRO stages 1, 2 and 3, drive the deepspeed engine for a few steps of a
tiny GPT and print (rank 0, one JSON line) what the optimizer really used at each step: every group's lr, betas
and momentum as the step reads them, and the Muon beta that reached DeepSpeed's muon_update; plus the Muon/AdamW
split and the groups the torch engine builds for the same model."""
from __future__ import annotations

import json
import sys

import torch

from model.config import BaseConfig
from model.nn.gpt import GPT, GPTConfig
from model.nn.optim import build_optimizers, lr_multiplier, muon_momentum
from model.train import engine, runtime

STEPS = 6


def main() -> None:
    cfg = BaseConfig(depth=2, head_dim=32, max_seq_len=32, total_batch_size=256, device_batch_size=2, num_iterations=STEPS,
                     muon_momentum_warmup=4, warmup_ratio=0.34, warmdown_ratio=0.34, final_lr_frac=0.1, grad_clip=0.0,
                     engine="deepspeed")
    rt = runtime.init("cpu")
    from deepspeed.runtime.zero.muon import muon_optimizer, original_muon

    used: list[dict] = []
    real_update, real_step = original_muon.muon_update, muon_optimizer.MuonWithAuxAdam.step

    def update(grad, momentum, beta=0.95, *args, **kwargs):
        used[-1]["muon_beta"].add(round(float(beta), 12))
        return real_update(grad, momentum, beta, *args, **kwargs)

    def step(self, *args, **kwargs):
        # ZeRO 1/2 step one group at a time (their param_groups narrowed to it): merge what each call used
        used[-1].setdefault("groups", {}).update({g["name"]: {"lr": g["lr"], "betas": list(g.get("betas") or []) or None,
                                          "momentum": g.get("momentum")} for g in self.param_groups})
        return real_step(self, *args, **kwargs)

    original_muon.muon_update = update  # ZeRO imports it from this module at each use
    muon_optimizer.MuonWithAuxAdam.step = step
    out = {}
    for stage in (1, 2, 3):
        torch.manual_seed(0)
        model = GPT(GPTConfig.from_base(cfg, 128))
        optimizers = build_optimizers(model, cfg)
        names = {id(p): n for n, p in model.named_parameters()}
        torch_groups = [{"params": sorted(names[id(p)] for p in g["params"]), "initial_lr": g["initial_lr"],
                         "muon": isinstance(opt, torch.optim.Muon), "betas": list(g.get("betas", [])) or None}
                        for opt in optimizers for g in opt.param_groups]
        trainer = engine.make(model, optimizers, cfg.model_copy(update={"zero_config": f"zero{stage}"}), rt, 2, 2, "base")
        split = sorted(n for n, p in model.named_parameters() if p.use_muon)
        used.clear()
        for i in range(STEPS):
            used.append({"muon_beta": set()})
            trainer.schedule(lr_multiplier(i, STEPS, cfg), muon_momentum(i, cfg))
            for _ in range(2):
                x = torch.randint(0, 128, (2, 32))
                trainer.backward(trainer.forward(x, x))
            trainer.step()
        out[stage] = {"split": split, "torch_groups": torch_groups, "ns_method": trainer.ns_method,
                      "steps": [{"muon_beta": sorted(u["muon_beta"]), "groups": u["groups"]} for u in used]}
    if rt.main:
        print(json.dumps(out))
    runtime.shutdown(rt)


if __name__ == "__main__":
    sys.exit(main())
