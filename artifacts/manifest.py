"""manifest.json: what an artifact is, where it came from, and the files it holds."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

SCHEMA = 1


@dataclass
class Manifest:
    key: str
    kind: str  # dataset, tokenizer, checkpoint, eval, evalset, report
    stage: str
    config: dict
    parents: dict[str, str]  # input name -> key (lineage)
    code: dict  # {"fingerprint": sha256 of the stage's modules, "version": package version / git commit}
    metrics: dict = field(default_factory=dict)
    files: dict[str, dict] = field(default_factory=dict)  # relative path -> {"size", "sha256"}
    created: str = ""
    host: str = ""
    wall_seconds: float | None = None
    schema: int = SCHEMA

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        if d.get("schema") != SCHEMA:
            raise ValueError(f"manifest schema {d.get('schema')!r}, expected {SCHEMA}")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def total_bytes(self) -> int:
        return sum(f["size"] for f in self.files.values())
