"""`data` stage: sources → parquet shards with a pinned train/val split (model/data/dataset.py)."""
from __future__ import annotations

from model.config import DataConfig

from .stage import StageContext, StageDef


def compute(cfg: DataConfig, ctx: StageContext) -> dict:
    from model.data.dataset import build

    download_dir = ctx.download_dir if cfg.download_dir is None else cfg.download_dir
    return build(cfg, ctx.out_dir, download_dir=download_dir)


STAGE = StageDef(
    name="data", kind="dataset", section="data", inputs=(),
    code=("model.data.dataset", "model.data.sources", "model.data.pypi"),
    compute=compute,
    describe="Collect text into parquet shards (text column, 1024-doc row groups, zstd) with a pinned train/val split.",
)
