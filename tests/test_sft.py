"""SFT loop: export round-trip, checkpoints and exact resume after an interrupted run."""
import json
import time

import pytest
import torch
from safetensors.torch import load_file

from ecomcap.config import FinetuneConfig, GenerateConfig, SFTConfig
from ecomcap.inference.generate import caption_images
from ecomcap.modeling.load import load_trained, read_output_marker
from ecomcap.training.collate import PromptBuilder
from ecomcap.training.data import ShardImages, epoch_order
from ecomcap.training.sft import run_sft

GEN = GenerateConfig(num_beams=2, max_new_tokens=8, batch_size=4)


def _cfg(out, **kw):
    base = dict(output_dir=out, max_steps=6, batch_size=4, lr=5e-3, eval_every=3, eval_images=4,
                save_every=2, seed=1)
    return SFTConfig(**{**base, **kw})


def _final_weights(path):
    return load_file(str(path / ("adapter_model.safetensors" if (path / "adapter_model.safetensors").is_file()
                                 else "model.safetensors")))


@pytest.mark.parametrize("strategy", ["lora", "full"])
def test_sft_exports_a_loadable_model(tiny_model_cfg, small_data, tmp_path, strategy):
    seen = []
    res = run_sft(small_data["train"], small_data["valid"], tiny_model_cfg,
                  FinetuneConfig(strategy=strategy, lora_r=4), _cfg(tmp_path / "o", max_steps=3),
                  GEN, on_metrics=lambda m, s: seen.append((s, m)))
    assert res.steps == 3 and res.params.trainable > 0
    marker = read_output_marker(res.final_dir)
    assert marker["kind"] == ("adapter" if strategy == "lora" else "full")
    assert (res.final_dir / ("adapter_model.safetensors" if strategy == "lora" else "model.safetensors")).is_file()
    assert not list(res.final_dir.glob("*.bin"))
    assert json.loads((res.final_dir / "training_config.json").read_text())["finetune"]["strategy"] == strategy
    assert res.best_dir is not None and res.evals and res.evals[-1]["step"] == 3
    assert [s for s, m in seen if "sft/loss" in m] == [1, 2, 3]
    assert any("sft/val_CIDEr-D" in m for _, m in seen)
    # save -> load -> generate gives the captions the exported weights give
    model, processor = load_trained(res.final_dir, tiny_model_cfg)
    data = ShardImages(small_data["valid"])
    images = [data.image(i) for i in range(3)]
    caps = caption_images(model, PromptBuilder(processor, tiny_model_cfg.prompt), images, GEN, progress=False)
    again, _ = load_trained(res.final_dir, tiny_model_cfg)
    caps2 = caption_images(again, PromptBuilder(processor, tiny_model_cfg.prompt), images, GEN, progress=False)
    assert caps == caps2 and len(caps) == 3


def test_resume_after_interruption_matches_an_uninterrupted_run(tiny_model_cfg, small_data, tmp_path):
    ft = FinetuneConfig(strategy="full")
    full = run_sft(small_data["train"], None, tiny_model_cfg, ft, _cfg(tmp_path / "a", eval_every=0), GEN)
    with pytest.raises(InterruptedError):
        run_sft(small_data["train"], None, tiny_model_cfg, ft,
                _cfg(tmp_path / "b", eval_every=0, stop_after_steps=5), GEN)
    run = next((tmp_path / "b").glob("run-*"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    resumed = run_sft(small_data["train"], None, tiny_model_cfg, ft, _cfg(tmp_path / "b", eval_every=0), GEN)
    assert resumed.resumed_from == 4 and resumed.steps == full.steps == 6
    a, b = _final_weights(full.final_dir), _final_weights(resumed.final_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert not (run / "checkpoints").exists()  # finished: nothing half-way left to resume


def test_a_changed_run_never_resumes_another_runs_checkpoint(tiny_model_cfg, small_data, tmp_path, caplog):
    """Same output_dir, another learning rate (or strategy): start fresh in a new folder, say so."""
    ft = FinetuneConfig(strategy="full")
    with pytest.raises(InterruptedError):
        run_sft(small_data["train"], None, tiny_model_cfg, ft, _cfg(tmp_path, eval_every=0, stop_after_steps=5), GEN)
    with caplog.at_level("WARNING"):
        other = run_sft(small_data["train"], None, tiny_model_cfg, FinetuneConfig(strategy="lora", lora_r=4),
                        _cfg(tmp_path, eval_every=0, lr=1e-3), GEN)
    assert other.resumed_from == 0 and other.steps == 6
    assert "not resumed" in caplog.text and "starts fresh" in caplog.text
    assert len(list(tmp_path.glob("run-*"))) == 2


def test_scst_starts_from_the_sft_run_of_this_config(tiny_model_cfg, small_data, tmp_path):
    """Two SFT configs share an output_dir; the SCST stage must pick the current config's run,
    not whichever finished last, and say so clearly when it has not run."""
    from ecomcap.training.sft import sft_output

    ft = FinetuneConfig(strategy="full")
    a_cfg, b_cfg = _cfg(tmp_path, eval_every=0, max_steps=2), _cfg(tmp_path, eval_every=0, max_steps=2, lr=1e-3)
    a = run_sft(small_data["train"], None, tiny_model_cfg, ft, a_cfg, GEN)
    run_sft(small_data["train"], None, tiny_model_cfg, ft, b_cfg, GEN)  # finishes last
    assert sft_output(small_data["train"], tiny_model_cfg, ft, a_cfg, 0) == a.model_dir
    assert sft_output(small_data["train"], tiny_model_cfg, ft, _cfg(tmp_path, lr=7e-4), 0) is None


def test_a_checkpoint_of_another_world_size_is_not_resumed(tiny_model_cfg, small_data, tmp_path, caplog):
    ft = FinetuneConfig(strategy="full")
    with pytest.raises(InterruptedError):
        run_sft(small_data["train"], None, tiny_model_cfg, ft, _cfg(tmp_path, eval_every=0, stop_after_steps=5), GEN)
    run = next(tmp_path.glob("run-*"))
    state = json.loads((run / "checkpoints" / "step-0000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 1
    state["world_size"] = 2  # as if written by a 2-process run
    (run / "checkpoints" / "step-0000004" / "trainer_state.json").write_text(json.dumps(state))
    with caplog.at_level("WARNING"):
        res = run_sft(small_data["train"], None, tiny_model_cfg, ft, _cfg(tmp_path, eval_every=0), GEN)
    assert res.resumed_from == 0 and "written by 2 processes" in caplog.text


def test_checkpoints_are_picked_on_a_dev_split_of_train(tiny_model_cfg, small_data, tmp_path):
    """With data.dev_images, in-training validation uses held-out training images (by id), so
    the validation split the gate scores on is never used for a training decision."""
    from ecomcap.training.data import dev_ids, train_and_dev

    dev = dev_ids(small_data["train"], 8)
    assert len(dev) == 8 and dev == dev_ids(small_data["train"], 8)
    train, select_on = train_and_dev(small_data["train"], small_data["valid"], 8)
    assert set(select_on.ids) == dev and not dev & set(train.ids)
    assert len(train) + len(select_on) == len(ShardImages(small_data["train"]))
    res = run_sft(small_data["train"], small_data["valid"], tiny_model_cfg, FinetuneConfig(strategy="full"),
                  _cfg(tmp_path, max_steps=3, eval_every=3, eval_images=50, save_every=0), GEN, dev_images=8)
    assert res.evals[-1]["n"] == 8  # scored on the 8 dev images, not on the valid split


def test_dev_split_never_empties_the_training_set(small_data, caplog):
    """The default dev_images (200) on a small train split: at most a fifth is held out."""
    from ecomcap.training.data import train_and_dev

    n = len(ShardImages(small_data["train"]))
    with caplog.at_level("WARNING"):
        train, select_on = train_and_dev(small_data["train"], small_data["valid"], 200)
    assert len(select_on) == n // 5 and len(train) == n - n // 5 and "more than a fifth" in caplog.text
    train, select_on = train_and_dev(small_data["train"], small_data["valid"], 10 * n)
    assert len(train) >= n - n // 5 > 0

def test_each_rank_restores_its_own_rng(tmp_path):
    """Ranks sample differently (SCST): a resumed rank 1 must continue rank 1's streams."""
    from ecomcap.training.checkpoint import load_checkpoint, save_checkpoint, save_rng

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    expected = {}
    for rank in (0, 1):
        torch.manual_seed(100 + rank)
        save_rng(tmp_path, 2, rank)
        expected[rank] = torch.rand(3)
    ckpt = save_checkpoint(tmp_path, 2, model, opt, sched, {}, keep=2)
    for rank in (1, 0):
        torch.manual_seed(0)
        load_checkpoint(ckpt, model, opt, sched, rank=rank)
        assert torch.equal(torch.rand(3), expected[rank])


def test_epoch_order_is_deterministic_and_covers_each_image_once(small_data):
    data = ShardImages(small_data["train"])
    e0, e0b, e1 = (epoch_order(data, 3, e) for e in (0, 0, 1))
    assert e0 == e0b and e0 != e1
    assert sorted(i for i, _ in e0) == list(range(len(data)))
    expanded = epoch_order(data, 3, 0, expand=True)
    assert len(expanded) == sum(len(t) for t in data.texts) == len(set(expanded))


def test_every_step_metric_is_in_mlflow_when_the_stage_returns(tiny_model_cfg, small_data, tmp_path):
    """Per-step metrics go to MLflow in batches of 25 steps; the loop flushes at its end, so the
    whole curve (5 steps: never a full batch) is stored when `run_sft` returns."""
    import mlflow

    from ecomcap.registry import tracking

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        with mlflow.start_run() as run:
            callback = tracking.metrics_callback()
            res = run_sft(small_data["train"], small_data["valid"], tiny_model_cfg, FinetuneConfig(strategy="lora",
                          lora_r=4), _cfg(tmp_path / "o", max_steps=5, eval_every=5, save_every=0), GEN,
                          on_metrics=callback)
            stored = mlflow.MlflowClient().get_metric_history(run.info.run_id, "sft.loss")  # run still open
    finally:
        mlflow.set_tracking_uri(previous)
    logged = [json.loads(ln) for ln in (res.final_dir.parent / "metrics.jsonl").read_text().splitlines()]
    assert sorted((m.step, m.value) for m in stored) == [(r["step"], r["loss"]) for r in logged if "loss" in r]
    assert len(stored) == 5


def test_step_metrics_are_stored_in_batches(tmp_path):
    """One MLflow write per `every` steps (a per-step SQLite write is ~5 ms); flush stores the rest."""
    import mlflow

    from ecomcap.registry.tracking import StepMetrics

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        with mlflow.start_run() as run:
            log = StepMetrics(every=3)
            client = mlflow.MlflowClient()
            stored = []
            for step in range(1, 8):
                log({"sft/loss": 1.0 / step, "sft/lr": 0.1}, step)
                stored.append(len(client.get_metric_history(run.info.run_id, "sft.loss")))
                time.sleep(0.002)  # each row keeps the time it was logged at, not the flush time
            log.flush()
            history = client.get_metric_history(run.info.run_id, "sft.loss")
    finally:
        mlflow.set_tracking_uri(previous)
    assert stored == [0, 0, 3, 3, 3, 6, 6]
    assert sorted((m.step, m.value) for m in history) == [(s, 1.0 / s) for s in range(1, 8)]
    stamps = [m.timestamp for m in sorted(history, key=lambda m: m.step)]
    assert stamps == sorted(stamps) and len(set(stamps)) == 7


def test_vision_lr_scale_gives_the_vision_tower_its_own_rate(tiny_model_cfg):
    from ecomcap.modeling.load import load_base
    from ecomcap.modeling.strategies import VISION, apply_strategy
    from ecomcap.training.loop import param_groups

    model, _ = load_base(tiny_model_cfg)
    model, _ = apply_strategy(model, FinetuneConfig(strategy="full"))
    one = param_groups(model, SFTConfig(lr=1e-3))
    assert len(one) == 1 and one[0]["lr"] == 1e-3
    llm, vision = param_groups(model, SFTConfig(lr=1e-3, vision_lr_scale=3.0))
    names = {id(p): n for n, p in model.named_parameters()}
    assert vision["lr"] == pytest.approx(3e-3) and llm["lr"] == 1e-3
    assert all(VISION.search(names[id(p)]) for p in vision["params"])
    assert not any(VISION.search(names[id(p)]) for p in llm["params"])
    assert len(llm["params"]) + len(vision["params"]) == sum(p.requires_grad for p in model.parameters())


def test_one_mlflow_hiccup_is_logged_not_fatal(tmp_path, caplog):
    """A write that fails once keeps its metrics for the next one (nothing lost, nothing twice);
    `max_failures` writes failing in a row fail the stage."""
    import mlflow

    from ecomcap.registry.tracking import StepMetrics

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        with mlflow.start_run() as run:
            log = StepMetrics(every=2, max_failures=2)
            real, calls = log.client.log_batch, []

            def flaky(*a, **kw):
                calls.append(1)
                if len(calls) in (1, 3, 4):
                    raise ConnectionError("MLflow server unreachable")
                return real(*a, **kw)

            log.client.log_batch = flaky
            with caplog.at_level("WARNING"):
                for step in range(1, 5):
                    log({"sft/loss": float(step)}, step)  # writes at steps 2 (fails) and 4 (sends all)
            assert "kept for the next write" in caplog.text
            history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "sft.loss")
            assert sorted(m.step for m in history) == [1, 2, 3, 4]
            log({"sft/loss": 5.0}, 5)
            log({"sft/loss": 6.0}, 6)  # fails (call 3): logged
            with pytest.raises(ConnectionError):
                log.flush()  # fails again (call 4): the second in a row is fatal
            log.flush(final=True)  # the stage's last write retries: call 5 stores steps 5 and 6
            history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "sft.loss")
            assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
    finally:
        mlflow.set_tracking_uri(previous)
