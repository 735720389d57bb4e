"""`mid_data`, `sft_data` and `rl_data` stages: conversation mixtures as artifacts (model/data/mixture.py).

Each reads the two evalset artifacts to drop any conversation that shares an n-gram with an eval item.
The content of local files (not their paths) enters the key, as for the evalsets' local directories.
"""
from __future__ import annotations

from model.config import MixtureConfig

from .stage import StageContext, StageDef

CODE = ("model.data.mixture", "model.data.chat_sources", "model.data.synthetic", "model.data.pypi",
        "model.data.sources", "model.data.decontam", "model.evals.evalsets", "model.evals.chat_tasks",
        "model.chat.conversation", "model.chat.calculator")


def local_fingerprint(cfg: MixtureConfig) -> dict:
    """{"local": [[pattern, [[file, sha256], ...]], ...]}: the local files' content (a pattern that matches
    nothing is recorded as empty; the stage itself then fails with a clear error)."""
    from model.data.chat_sources import local_files
    from model.data.pypi import file_sha256
    from model.errors import InputError

    out = []
    for entry in [*cfg.train, *cfg.val]:
        if entry.source != "local" or not entry.paths:
            continue
        for pattern in entry.paths:
            try:
                files = local_files([pattern])
            except InputError:
                files = []
            out.append([pattern, [[f.name, file_sha256(f)] for f in files]])
    return {"local": out}


def _stage(name: str, describe: str) -> StageDef:
    def compute(cfg: MixtureConfig, ctx: StageContext) -> dict:
        from model.data.mixture import build

        download_dir = ctx.download_dir if cfg.download_dir is None else cfg.download_dir
        evalsets = {s: ctx.inputs[s] for s in ("core_evalset", "chat_evalset")}
        return build(cfg, ctx.out_dir, download_dir, evalsets, stage=name, log=ctx.log)

    return StageDef(name=name, kind="conversations", section=name, inputs=("core_evalset", "chat_evalset"),
                    code=CODE, compute=compute, fingerprint=local_fingerprint, describe=describe)


MID_DATA = _stage("mid_data", "Mid-training conversations (nanochat: SmolTalk, MMLU auxiliary train, GSM8K train), "
                              "normalized, shuffled and decontaminated against every eval set.")
SFT_DATA = _stage("sft_data", "SFT conversations (nanochat: ARC train, GSM8K train, SmolTalk), normalized, shuffled "
                              "and decontaminated against every eval set.")
RL_DATA = _stage("rl_data", "RL problems with checkable answers (nanochat: GSM8K train), decontaminated against "
                            "every eval set.")
STAGES = (MID_DATA, SFT_DATA, RL_DATA)
