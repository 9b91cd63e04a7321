"""The whole training configuration, typed: TOML loading, `--set` overrides and validation in one place.

A run config is a TOML file with the tables [model], [heads], [data], [train], [mesh] and [run]. Each
table maps onto a frozen dataclass; every key is checked for its name, its type and its range when the
file is loaded, so a wrong value fails in a second with one line naming it, never after the backbone
loaded or the dataset was built.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing

import jax

from clp_jax.drafting.heads import HeadsConfig
from clp_jax.model import files
from clp_jax.model.config import parse_dtype
from clp_jax.model.sharding import MeshConfig
from clp_jax.train.data import DataConfig
from clp_jax.train.objectives import TrainConfig


class ConfigError(ValueError):
    """A run config value has the wrong name, type or range."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSource:
    """[model]: which backbone (a --model value of decode.py) and its compute dtype."""

    name: str = "demo"
    dtype: str = "float32"

    def __post_init__(self):
        if not self.name:
            raise ConfigError("model.name is empty: give 'demo', a .gguf file, a Hugging Face directory or hub id.")
        try:
            parse_dtype(self.dtype)
        except ValueError as e:
            raise ConfigError(f"model.dtype: {e}") from e


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainMeshConfig(MeshConfig):
    """[mesh]: the device mesh, and whether this is one process of a multi-host pod."""

    distributed: bool = False  # call jax.distributed.initialize() before anything else

    def __post_init__(self):
        for name in ("data", "model"):
            if getattr(self, name) < 1:
                raise ConfigError(f"mesh.{name} must be >= 1, got {getattr(self, name)}.")

    def mesh_config(self) -> MeshConfig:
        return MeshConfig(data=self.data, model=self.model)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """[run]: the phases around the training step (features, drafter, CLP, evaluation, saved heads)."""

    out_dir: str = "runs/demo"
    features_dir: str = ""  # the feature store (default: out_dir/features); runs may share one
    # self-distilled records' tokens, kept apart from the features (~50 KB per shard, e.g. in the repository):
    # a store lost with its machine is rebuilt from them by teacher forcing instead of generation ("": none)
    continuations_dir: str = ""
    # "build": write every missing shard of the plan before training; "skip": train on the complete shards
    # the store holds now (e.g. while a data job elsewhere is still filling it); "teacher-forced": build only
    # what needs no generation (kept continuations, corpus text), then train on the complete shards
    missing_shards: str = "build"
    steps: int = 200  # drafter phase
    batch_size: int = 8  # windows per step, global over all processes
    window: int = 256  # positions per window (<= data.seq_len)
    vocab_size: int = 8192  # the drafters' vocabulary: the most frequent backbone labels (0: all tokens)
    clp_steps: int = 100  # CLP phase (0: keep the CLP untrained)
    clp_batch_size: int = 8
    seed: int = 0
    save_every: int = 50
    keep: int = 3
    gen_batch_size: int = 32  # prompts decoded at once while self-distilling
    feature_batch_size: int = 8  # corpus records per trunk pass
    eval_batch_size: int = 8
    eval_records: int = 256  # held-out records evaluated per kind (at most)
    eval_every: int = 0  # drafter phase: score held-out agreement every this many steps (0: only at the end)
    patience: int = 0  # end the drafter phase after this many scores without a better one (0: never early)
    validation_records: int = 16  # held-out records per kind in those scores
    time_budget_minutes: float = 0.0  # per training phase; 0: none (a later run continues where it stopped)
    init_from: str = ""  # a heads checkpoint to warm-start the drafter (and CLP) from
    stop_after: str = ""  # "features" or "drafter": end the run after that phase
    checkpoint_dir: str = ""  # Orbax training checkpoints, e.g. gs://bucket/run (default: out_dir)
    # the drafter trains on a seeded random subset of the 'train' records holding about this many targets
    # (0: all), nested (a smaller subset lies inside a larger one): a data-size curve from one store
    train_targets: int = 0
    train_kinds: tuple[str, ...] = ()  # train only on records of these kinds (prompts.KINDS; empty: all)

    def __post_init__(self):
        bounds = dict(steps=(1, 10_000_000), batch_size=(1, 65536), window=(8, 8192), vocab_size=(0, 1_000_000),
                      clp_steps=(0, 10_000_000), clp_batch_size=(1, 65536), seed=(0, 2 ** 31 - 1),
                      save_every=(1, 10_000_000), keep=(1, 1000), gen_batch_size=(1, 4096),
                      feature_batch_size=(1, 4096), eval_batch_size=(1, 65536), eval_records=(1, 10_000_000),
                      eval_every=(0, 10_000_000), patience=(0, 1000), validation_records=(1, 10_000_000),
                      train_targets=(0, 10_000_000_000))
        for name, (lo, hi) in bounds.items():
            if not lo <= getattr(self, name) <= hi:
                raise ConfigError(f"run.{name} must be in {lo}..{hi}, got {getattr(self, name)}.")
        if self.patience and not self.eval_every:
            raise ConfigError("run.patience needs run.eval_every > 0 (how often the held-out score is taken).")
        from clp_jax.train.prompts import KINDS

        unknown = [k for k in self.train_kinds if k not in KINDS]
        if unknown:
            raise ConfigError(f"run.train_kinds: unknown {unknown}; choose from {list(KINDS)}.")
        if not self.out_dir:
            raise ConfigError("run.out_dir is empty: name a directory for the run's outputs.")
        if self.time_budget_minutes < 0:
            raise ConfigError(f"run.time_budget_minutes must be >= 0, got {self.time_budget_minutes}.")
        if self.missing_shards not in ("build", "skip", "teacher-forced"):
            raise ConfigError("run.missing_shards must be 'build', 'skip' or 'teacher-forced', "
                              f"got {self.missing_shards!r}.")
        if self.stop_after not in ("", "features", "drafter"):
            raise ConfigError(f"run.stop_after must be '', 'features' or 'drafter', got {self.stop_after!r}.")
        if self.init_from and not os.path.isdir(os.path.expanduser(self.init_from)):
            raise ConfigError(f"run.init_from = {self.init_from!r} is not a directory; give a heads checkpoint "
                              "(a run's heads/ directory or clp_jax/shipped/demo_heads).")

    @property
    def store_dir(self) -> str:
        return self.features_dir or os.path.join(self.out_dir, "features")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """A whole run. `heads` holds HeadsConfig fields except the backbone's sizes (known once it loads)."""

    model: ModelSource = ModelSource()
    heads: dict = dataclasses.field(default_factory=dict)
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    mesh: TrainMeshConfig | None = None  # None: no mesh (one device)
    run: RunConfig = RunConfig()

    def heads_config(self, backbone_cfg) -> HeadsConfig:
        """The heads for this backbone (its width, vocabulary and, for the draft layer, block geometry)."""
        if self.heads.get("kind") == "draft_layer":
            return HeadsConfig.for_backbone(backbone_cfg, **self.heads)
        return HeadsConfig(hidden_size=backbone_cfg.hidden_size, vocab_size=backbone_cfg.vocab_size, **self.heads)


_HEADS_FROM_BACKBONE = ("hidden_size", "vocab_size", "layer")
SECTIONS: dict[str, type] = {"model": ModelSource, "heads": HeadsConfig, "data": DataConfig,
                             "train": TrainConfig, "mesh": TrainMeshConfig, "run": RunConfig}


def _expected(typ) -> str:
    if typing.get_origin(typ) is tuple:
        return "a list of strings"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(typ, str(typ))


def _coerce(section: str, key: str, value, typ):
    """value as `typ`, or a ConfigError naming the key, the value and what was expected."""
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}
    if typing.get_origin(typ) is tuple:
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            return tuple(value)
    elif ok[typ](value):
        return float(value) if typ is float else value
    raise ConfigError(f"{section}.{key} = {value!r}: expected {_expected(typ)}. Fix it in the config file "
                      f"or override it with --set {section}.{key}=VALUE.")


def _section(name: str, table) -> dict:
    """The checked keyword arguments of one table."""
    cls = SECTIONS[name]
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}] must be a table of key = value pairs, got {table!r}.")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls) if not (name == "heads" and f.name in _HEADS_FROM_BACKBONE)]
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(f"Unknown key(s) {unknown} in [{name}]; expected some of: {', '.join(fields)}.")
    return {key: _coerce(name, key, value, hints[key]) for key, value in table.items()}


def build(tables: dict) -> Config:
    """A Config from parsed TOML tables; raises ConfigError on any unknown, mistyped or out-of-range value."""
    unknown = sorted(set(tables) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"Unknown config section(s) {unknown}; expected some of: {', '.join(SECTIONS)}.")
    kw = {name: _section(name, table) for name, table in tables.items()}
    try:
        heads = kw.get("heads", {})
        try:
            geometry = {"layer": (("hidden_size", 1),)} if heads.get("kind") == "draft_layer" else {}
            HeadsConfig(hidden_size=1, vocab_size=1, **geometry, **heads)  # range checks of the heads' own fields
        except ValueError as e:
            raise ConfigError(str(e).replace("HeadsConfig.", "heads.")) from e
        cfg = Config(model=ModelSource(**kw.get("model", {})), heads=heads, data=DataConfig(**kw.get("data", {})),
                      train=TrainConfig(**kw.get("train", {})),
                      mesh=TrainMeshConfig(**kw["mesh"]) if "mesh" in kw else None,
                      run=RunConfig(**kw.get("run", {})))
        if cfg.run.window > cfg.data.seq_len:
            raise ConfigError(f"run.window ({cfg.run.window}) must be <= data.seq_len ({cfg.data.seq_len}).")
        if cfg.train.soft_weight and not cfg.data.soft_topk:
            raise ConfigError("train.soft_weight > 0 needs soft labels in the feature store: set data.soft_topk > 0.")
        return cfg
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e


def parse_override(item: str) -> tuple[str, str, object]:
    """'section.key=value' -> (section, key, value); the value is read as TOML, else kept as a string."""
    key, eq, value = item.partition("=")
    section, _, name = key.strip().partition(".")
    if not eq or not name or section not in SECTIONS:
        raise ConfigError(f"--set {item!r} must look like SECTION.KEY=VALUE with SECTION one of "
                          f"{', '.join(SECTIONS)}, e.g. --set train.learning_rate=3e-4.")
    try:
        return section, name.strip(), tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return section, name.strip(), value


def load_config(path: str, overrides: typing.Sequence[str] = ()) -> Config:
    """A TOML run config plus `section.key=value` overrides, fully validated."""
    example = "see configs/draft_layer_demo.toml for one that works"
    text = files.read_text(path, "Config", hint=f"Give a TOML run config ({example}).",
                           empty_hint=f"A run config needs at least one table such as [run] ({example}).")
    try:
        tables = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"Config {path!r} is not valid TOML ({e}): fix that line ({example}).") from e
    if not tables:
        raise ConfigError(f"Config {path!r} holds only comments: a run config needs at least one table "
                          f"such as [run] ({example}).")
    for item in overrides:
        section, name, value = parse_override(item)
        tables.setdefault(section, {})[name] = value
    return build(tables)


def check_batch_sizes(rc: RunConfig, mesh) -> None:
    """Global batch sizes must divide the mesh's data axis and the processes, before anything is built."""
    for key in ("batch_size", "clp_batch_size", "eval_batch_size"):
        value = getattr(rc, key)
        if mesh is not None and value % mesh.shape["data"]:
            raise ConfigError(f"run.{key}={value} does not divide the mesh's data axis ({mesh.shape['data']}).")
        if value % jax.process_count():
            raise ConfigError(f"run.{key}={value} does not divide the {jax.process_count()} processes.")
