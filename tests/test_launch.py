"""Training stages in processes of their own (`ecomcap.launch`): one process with plain Python,
two under `accelerate launch` (torchrun, gloo on this CPU box); per-rank GPU placement."""
import pytest
import torch

from ecomcap.config import LaunchConfig, ModelConfig
from ecomcap.errors import EcomcapError
from ecomcap.launch import command, launch


@pytest.mark.parametrize("n", [1, 2])
def test_every_rank_runs_and_rank0_result_comes_back(tmp_path, n):
    res = launch("tests.launch_targets:report", {"out": str(tmp_path), "value": 21}, LaunchConfig(num_processes=n),
                 name="t")
    assert res == {"rank": 0, "world": n, "value": 42}
    assert sorted(p.name for p in tmp_path.glob("rank*.txt")) == [f"rank{r}.txt" for r in range(n)]
    assert all(p.read_text() == f"{n}\n" for p in tmp_path.glob("rank*.txt"))


def test_a_failing_rank_fails_the_stage_with_its_output(tmp_path):
    with pytest.raises(EcomcapError, match="boom on rank 1") as err:
        launch("tests.launch_targets:fail_on_rank", {"rank": 1}, LaunchConfig(num_processes=2), name="sft")
    assert "sft: the training processes failed" in str(err.value)


def test_a_clear_error_stays_clear(tmp_path):
    with pytest.raises(EcomcapError, match="the data has no train split"):
        launch("tests.launch_targets:clear_error", {}, LaunchConfig(), name="sft")


def test_rank0_logs_to_the_steps_mlflow_run(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the child must get it from the launcher
    try:
        with mlflow.start_run() as run:
            res = launch("tests.launch_targets:log_metric", {"name": "sft.loss"}, LaunchConfig(num_processes=2),
                         name="sft")
        assert res == {"active": True}
        assert mlflow.get_run(run.info.run_id).data.metrics["sft.loss"] == 1.5
    finally:
        mlflow.set_tracking_uri(previous)


def test_commands(tmp_path):
    spec = tmp_path / "spec.json"
    assert command(spec, LaunchConfig())[1:] == ["-m", "ecomcap.launch", str(spec)]
    ds = command(spec, LaunchConfig(num_processes=2, config_file="configs/accelerate/deepspeed_zero3.yaml",
                                    main_process_port=29555))
    assert ds[1:] == ["launch", "--num_processes", "2", "--num_machines", "1", "--main_process_port", "29555",
                      "--config_file", "configs/accelerate/deepspeed_zero3.yaml", "-m", "ecomcap.launch", str(spec)]
    with pytest.raises(EcomcapError, match="does not exist"):
        command(spec, LaunchConfig(num_processes=2, config_file="configs/accelerate/nope.yaml"))


@pytest.fixture
def two_fake_gpus(monkeypatch):
    """MOCK (no GPU exists here): CUDA reports two devices; placement calls are recorded."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", str(d))))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    return calls


def test_each_rank_loads_onto_its_own_gpu(two_fake_gpus, tiny_model_cfg, monkeypatch):
    """Rank 1 of a 2-GPU launch: weights (4-bit or not) placed on GPU 1 at load time, not built whole
    in host memory first (8 ranks of a node would hold 8 copies there)."""
    from ecomcap.modeling import load

    seen = []

    class Model:
        def to(self, device):
            seen.append(("to", str(device)))
            return self

        def eval(self):
            return self

        def named_modules(self):
            return iter(())

    def from_pretrained(name, **kwargs):
        seen.append(("device_map", kwargs.get("device_map")))
        return Model()

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(load.AutoModelForImageTextToText, "from_pretrained", from_pretrained)
    cfg = ModelConfig(name_or_path=tiny_model_cfg.name_or_path, device="cuda")
    assert load.pick_device(cfg) == torch.device("cuda", 1)
    load.load_base(cfg, quantization_config=object())
    load.load_base(cfg)
    assert seen == [("device_map", {"": 1}), ("device_map", {"": 1})]
    assert two_fake_gpus == [("set_device", "cuda:1")] * 2
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(EcomcapError, match="only 2 GPU"):
        load.pick_device(cfg)


def test_a_batch_without_an_image_is_refused(tiny_model_cfg, small_data):
    from PIL import Image

    from ecomcap.modeling.processor import load_processor
    from ecomcap.training.collate import PromptBuilder

    builder = PromptBuilder(load_processor(tiny_model_cfg.name_or_path), "描述商品。")
    with pytest.raises(EcomcapError, match="multimodal"):
        builder.prompts([Image.new("RGB", (32, 32)), None])


def test_the_step_run_stays_running_and_nested_launches_start_their_own_group(tmp_path, monkeypatch):
    """Rank 0 resumes the step's MLflow run; its exit must not mark the run FINISHED while the step
    goes on. A launch from inside a launched process (RANK etc. set) starts its own group."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("MASTER_PORT", "1")
    try:
        with mlflow.start_run() as run:
            res = launch("tests.launch_targets:report", {"out": str(tmp_path), "value": 1}, LaunchConfig(), name="t")
            assert mlflow.get_run(run.info.run_id).info.status == "RUNNING"
        assert res["rank"] == 0 and res["world"] == 1
    finally:
        mlflow.set_tracking_uri(previous)


def test_every_failing_ranks_reason_heads_the_error(tmp_path):
    with pytest.raises(EcomcapError) as err:
        launch("tests.launch_targets:fail_on_rank", {"rank": 1}, LaunchConfig(num_processes=2), name="sft")
    head = str(err.value).split("Last output:")[0]
    assert "rank 1: RuntimeError: boom on rank 1" in head


def test_qlora_under_zero3_is_refused_before_any_process_starts():
    from ecomcap.config import RunConfig
    from ecomcap.training.stages import check_strategy_fits_launch

    cfg = RunConfig.model_validate({"finetune": {"strategy": "qlora"},
                                    "launch": {"num_processes": 2,
                                               "config_file": "configs/accelerate/deepspeed_zero3.yaml"}})
    with pytest.raises(EcomcapError, match="ZeRO-3"):
        check_strategy_fits_launch(cfg, "sft")
    with pytest.raises(EcomcapError, match="ZeRO-3"):
        check_strategy_fits_launch(cfg, "scst")  # its base is the 4-bit one too
    zero2 = cfg.model_copy(update={"launch": cfg.launch.model_copy(
        update={"config_file": "configs/accelerate/deepspeed_zero2.yaml"})})
    check_strategy_fits_launch(zero2, "sft")


def test_retrieval_takes_several_processes_but_not_deepspeed_in_its_config():
    """Retrieval trains under DDP (tests/test_retrieval_ddp.py); its towers bypass DeepSpeed/FSDP."""
    from pydantic import ValidationError

    from ecomcap.retrieval.config import RetrievalRunConfig

    assert RetrievalRunConfig.model_validate({"launch": {"num_processes": 2}}).launch.num_processes == 2
    with pytest.raises(ValidationError, match="(?i)selects deepspeed"):
        RetrievalRunConfig.model_validate({"launch": {"num_processes": 2,
                                                      "config_file": "configs/accelerate/deepspeed_zero2.yaml"}})


def test_a_4bit_base_is_refused_inside_a_zero3_load(tiny_model_cfg, monkeypatch):
    """Whatever config got there (a DeepSpeed JSON, `--from` a QLoRA output): never a silent bf16
    load where 4-bit was asked. STAND-IN: the ZeRO-3 `zero.Init` context is reported by patching
    `sharded_load` (real ZeRO-3 loads are covered by tests/test_deepspeed.py)."""
    from ecomcap.modeling import load

    monkeypatch.setattr(load, "sharded_load", lambda: True)
    with pytest.raises(EcomcapError, match="ZeRO-3"):
        load.load_base(tiny_model_cfg, quantization_config=object())


def test_launched_processes_get_expandable_segments_unless_set(monkeypatch):
    from ecomcap.launch import _child_env

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert _child_env(2, None)["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert _child_env(2, None)["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
