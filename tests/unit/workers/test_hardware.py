"""dtype: auto (workers/hardware.py): bfloat16 only where the hardware runs it natively, resolved
once when a flow starts so stage keys and manifests carry the dtype actually used. The capability
probes are replaced: the test machine's own CPU decides nothing here."""

from __future__ import annotations

import warnings

import pytest

from alignflow.config import JudgeConfig, PipelineConfig, SampleConfig, SelfImproveConfig
from alignflow.flows.self_improve import Steps, run_rounds
from alignflow.storage.artifacts import ArtifactRef
from alignflow.tasks.judge import JUDGE
from alignflow.tasks.sample import SAMPLE
from alignflow.workers import hardware
from alignflow.workers.hardware import resolve_dtype, resolve_dtypes

HOSTS = {  # (CUDA with bf16, CPU AVX512-BF16, CPU AMX)
    "avx2_only": (False, False, False),
    "avx512_bf16": (False, True, False),
    "amx": (False, False, True),
    "cuda_bf16_on_avx2": (True, False, False),
}


@pytest.fixture
def host(monkeypatch):
    def use(name: str) -> None:
        cuda, avx512_bf16, amx = HOSTS[name]
        monkeypatch.setattr(hardware, "cuda_bf16", lambda: cuda)
        monkeypatch.setattr(hardware, "cpu_avx512_bf16", lambda: avx512_bf16)
        monkeypatch.setattr(hardware, "cpu_amx", lambda: amx)

    return use


@pytest.mark.parametrize(
    "name, device, expected",
    [
        ("avx2_only", "cpu", "float32"),
        ("avx512_bf16", "cpu", "bfloat16"),
        ("amx", "cpu", "bfloat16"),
        ("cuda_bf16_on_avx2", "cpu", "float32"),
        ("cuda_bf16_on_avx2", "cuda", "bfloat16"),
        ("avx512_bf16", "cuda", "float32"),  # a GPU without bf16: the CPU's support does not matter
    ],
)
def test_auto_is_bfloat16_only_where_native(host, name, device, expected):
    host(name)
    assert resolve_dtype("auto", device) == expected


def test_explicit_dtype_wins(host):
    host("avx512_bf16")
    assert resolve_dtype("float32") == "float32"
    host("avx2_only")
    with pytest.warns(UserWarning, match="emulates it"):
        assert resolve_dtype("bfloat16") == "bfloat16"


def test_native_bfloat16_is_not_warned_about(host):
    host("amx")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_dtype("bfloat16") == "bfloat16"
        assert resolve_dtype("bfloat16", "cuda") == "bfloat16"  # a GPU's bf16 is never emulated by the CPU


def test_every_dtype_field_of_a_flow_config_is_resolved(host):
    host("avx2_only")
    config = SelfImproveConfig(judge=JudgeConfig(dtype="bfloat16"))
    with pytest.warns(UserWarning, match="emulates it"):
        resolved = resolve_dtypes(config)
    assert (config.sample.dtype, config.judge.dtype) == ("auto", "bfloat16")  # the original is not changed
    assert (resolved.sample.dtype, resolved.judge.dtype) == ("float32", "bfloat16")
    assert resolved.model_dump(exclude={"sample"}) == config.model_dump(exclude={"sample"})


def test_ray_gpu_replicas_resolve_for_cuda_each_half_of_a_pipeline_for_itself(host):
    host("cuda_bf16_on_avx2")
    config = PipelineConfig.model_validate({"training": {"executor": "ray", "ray": {"gpus_per_replica": 1}}})
    resolved = resolve_dtypes(config)
    assert (resolved.training.sample.dtype, resolved.training.judge.dtype) == ("bfloat16", "bfloat16")
    assert resolved.genies.scoring.dtype == "float32"  # the genies half runs locally, on this AVX2 CPU
    cpu_replicas = config.model_copy(
        update={
            "training": config.training.model_copy(
                update={"ray": config.training.ray.model_copy(update={"gpus_per_replica": 0})}
            )
        }
    )
    assert resolve_dtypes(cpu_replicas).training.sample.dtype == "float32"


def _recording_steps(keys: dict) -> Steps:
    """The flow body's stage calls, recorded as the keys the real stages would give them (nothing computed)."""

    def ref(stage: str, key: str) -> ArtifactRef:
        return ArtifactRef(stage=stage, key=key, uri=f"memory://{stage}/{key}", content_hash=key)

    def keyed(stage):
        def step(ctx, config, **parents):
            keys[stage.name] = stage.key(config, parents)
            return ref(stage.name, keys[stage.name])

        return step

    def passthrough(name):
        return lambda *args, **kwargs: ref(name, name)

    return Steps(
        prompts=passthrough("prompts"),
        base_model=passthrough("model"),
        sample=keyed(SAMPLE),
        judge=keyed(JUDGE),
        pairs=passthrough("pairs"),
        logprobs=passthrough("logprobs"),
        train_dpo=passthrough("train_dpo"),
    )


def test_the_flow_keys_stages_by_the_resolved_dtype(host, tmp_path):
    host("avx2_only")
    keys = {}
    for dtype in ("auto", "float32", "bfloat16"):
        config = SelfImproveConfig(
            paths={"home": str(tmp_path)}, sample=SampleConfig(dtype=dtype), judge=JudgeConfig(dtype=dtype)
        )
        keys[dtype] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # explicit bfloat16 on this AVX2 host: warned about, tested above
            run_rounds(config, _recording_steps(keys[dtype]))
    assert keys["auto"] == keys["float32"]  # auto on an AVX2 host is float32: the same artifacts
    assert keys["auto"]["sample"] != keys["bfloat16"]["sample"] and keys["auto"]["judge"] != keys["bfloat16"]["judge"]
