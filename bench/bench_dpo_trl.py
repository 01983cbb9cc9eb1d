"""DPO training and reference log-probs: alignflow versus TRL's DPOTrainer, on the
same model, pairs, LoRA, batch size, epochs and precision (float32, CPU), and
the reference log-probs also versus a naive per-pair transformers loop.

Each side runs in its own process, back to back in one command, so that peak
memory (ru_maxrss) is each side's own:
- alignflow: the logprobs stage's function (reference log-probs), then
  the train_dpo loop (tasks/training.py) on those log-probs.
- TRL: DPOTrainer(precompute_ref_log_probs=True), which computes its reference
  log-probs when the trainer is built, then trainer.train() on them.
- naive: reference log-probs only, one forward pass per response (batch 1, full
  logits), on alignflow's token ids, so its sums must equal alignflow's.
Padding waste is the share of the token positions fed to the model that are
padding: alignflow's length-bucketed batches under a token budget, TRL's
batches of `batch size` pairs in dataset order with chosen and rejected padded
together to the longest (its collator), none for batch 1.
The train timings cover training only (reference log-probs precomputed on both
sides); tokens are prompt + response tokens of both sides of every pair, per epoch.
TRL runs with gradient checkpointing off (its default is on) because alignflow
does not checkpoint: the same work on both sides.

    pip install -e '.[bench]'
    python bench/bench_dpo_trl.py --data-dir $ALIGNFLOW_HOME/genies --pairs 64 --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import one_sequence_logprob, padding_waste

from alignflow.config import DPOConfig, LogprobsConfig, alignflow_home

LORA = {"r": 16, "alpha": 32}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def load_pairs(args) -> list[dict]:
    from alignflow.genies.data import capped
    from alignflow.tasks.preferences import read_preferences

    pairs = read_preferences(f"genies:{args.data_dir}:{args.distribution}:train")
    return capped(pairs, args.pairs, 0, id_field="id")


def dpo_config(args) -> DPOConfig:
    return DPOConfig(
        lr=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        val_fraction=0.0,
        checkpoint_every=10**6,
        eval_every=10**6,
        lora=LORA,
    )


def sequence_lengths(rows: list[dict]) -> list[int]:
    """Lengths of the chosen then the rejected sequences, prompt included."""
    return [len(r["prompt_ids"]) + len(r["chosen_ids"]) for r in rows] + [
        len(r["prompt_ids"]) + len(r["rejected_ids"]) for r in rows
    ]


def run_naive(args, model_dir: Path) -> dict:
    from alignflow.workers.chat import encode_pair
    from alignflow.workers.hf import HFBackend

    pairs = load_pairs(args)
    backend = HFBackend(model_dir, dtype="float32")
    started = time.perf_counter()
    rows = [encode_pair(backend.tokenizer, p, backend.stop_ids, None, None) for p in pairs]
    logps = [
        one_sequence_logprob(backend.model, r["prompt_ids"], r[f"{side}_ids"])
        for side in ("chosen", "rejected")
        for r in rows
    ]
    seconds = time.perf_counter() - started
    return {
        "side": "naive",
        "pairs": len(rows),
        "precompute_s": seconds,
        "precompute_tokens": sum(sequence_lengths(rows)),
        "padding_waste": 0.0,
        "logps": logps,
        "peak_rss_mb": peak_rss_mb(),
    }


def run_ours(args, model_dir: Path) -> dict:
    from alignflow.storage.artifacts import ArtifactStore
    from alignflow.tasks.logprobs import reference_logprobs
    from alignflow.tasks.train_dpo import dpo_objective
    from alignflow.tasks.training import Checkpoints, prepare_model, train
    from alignflow.workers.hf import HFBackend
    from alignflow.workers.scoring import token_budget_batches

    pairs = [{**p, "prompt_id": p["id"]} for p in load_pairs(args)]
    backend = HFBackend(model_dir, dtype="float32", token_budget=args.token_budget)
    started = time.perf_counter()
    rows, ref_metrics = reference_logprobs(backend, pairs, LogprobsConfig(token_budget=args.token_budget))
    precompute_s = time.perf_counter() - started
    del backend
    config = dpo_config(args)
    model, tokenizer = prepare_model(model_dir, config)
    rss_before = current_rss_mb()
    scratch = tempfile.mkdtemp(prefix="bench-dpo-")
    started = time.perf_counter()
    state = train(
        model,
        rows,
        [],
        config,
        dpo_objective(config, tokenizer.pad_token_id),
        Checkpoints(ArtifactStore(scratch), "train_dpo", "bench"),
    )
    train_s = time.perf_counter() - started
    tokens = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
    lengths = sequence_lengths(rows)
    batches = [[lengths[i] for i in batch] for batch in token_budget_batches(lengths, args.token_budget)]
    return {
        "side": "alignflow",
        "pairs": len(rows),
        "precompute_s": precompute_s,
        "precompute_tokens": ref_metrics["tokens"],
        "padding_waste": padding_waste(batches),
        "logps": [r["chosen_logp"] for r in rows] + [r["rejected_logp"] for r in rows],
        "train_s": train_s,
        "train_tokens": tokens * args.epochs,
        "steps": state.step,
        "first_loss": state.log[0]["loss"],
        "last_loss": state.log[-1]["loss"],
        "rss_before_train_mb": rss_before,
        "peak_rss_mb": peak_rss_mb(),
    }


def run_trl(args, model_dir: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    from alignflow.tasks.training import total_steps

    pairs = load_pairs(args)
    data = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": p["prompt"]}],
                "chosen": [{"role": "assistant", "content": p["chosen"]}],
                "rejected": [{"role": "assistant", "content": p["rejected"]}],
            }
            for p in pairs
        ]
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    ours = dpo_config(args)
    out = tempfile.mkdtemp(prefix="bench-trl-")
    config = TRLConfig(
        output_dir=out,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, round(ours.warmup_ratio * total_steps(len(pairs), ours))),
        weight_decay=0.0,
        max_grad_norm=ours.max_grad_norm,
        beta=ours.beta,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=args.batch_size,
        max_length=None,
        gradient_checkpointing=False,
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    lora = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        target_modules=list(ours.lora.target_modules),
    )
    started = time.perf_counter()
    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, peft_config=lora)
    build_s = time.perf_counter() - started  # tokenisation + reference log-probs
    tokenized = trainer.train_dataset
    tokens = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in tokenized)
    batches = [
        sequence_lengths(tokenized.select(range(i, min(i + args.batch_size, len(tokenized)))))
        for i in range(0, len(tokenized), args.batch_size)
    ]
    rss_before = current_rss_mb()
    started = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - started
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]  # logging_steps=1: every step
    return {
        "side": "trl",
        "pairs": len(tokenized),
        "precompute_s": build_s,
        "precompute_tokens": tokens,
        "padding_waste": padding_waste(batches),
        "train_s": train_s,
        "train_tokens": tokens * args.epochs,
        "steps": result.global_step,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "rss_before_train_mb": rss_before,
        "peak_rss_mb": peak_rss_mb(),
    }


def run_side(args) -> None:
    from alignflow.workers.models import resolve_model_dir

    model_dir = resolve_model_dir(args.model, alignflow_home() / "models")
    result = {"alignflow": run_ours, "trl": run_trl, "naive": run_naive}[args.side](args, model_dir)
    print("RESULT " + json.dumps(result))


def compare(args, argv: list[str]) -> None:
    sides = {}
    for side in ("alignflow", "trl", "naive"):
        done = subprocess.run([sys.executable, __file__, "--side", side, *argv], capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            raise SystemExit(f"{side} failed:\n{done.stderr[-3000:]}")
        sides[side] = json.loads(lines[-1].removeprefix("RESULT "))
    ours, trl, naive = sides["alignflow"], sides["trl"], sides["naive"]
    logp_diff = max(abs(a - b) for a, b in zip(ours.pop("logps"), naive.pop("logps")))

    def rate(r, kind):
        return r[f"{kind}_tokens"] / r[f"{kind}_s"]

    print(
        json.dumps(
            {
                **sides,
                "train_tok_s": {"alignflow": round(rate(ours, "train"), 1), "trl": round(rate(trl, "train"), 1)},
                "train_throughput_ratio_ours_over_trl": round(rate(ours, "train") / rate(trl, "train"), 3),
                "precompute_tok_s": {
                    "alignflow": round(rate(ours, "precompute"), 1),
                    "trl": round(rate(trl, "precompute"), 1),
                },
                "precompute_throughput_ratio_ours_over_trl": round(
                    rate(ours, "precompute") / rate(trl, "precompute"), 3
                ),
                "precompute_tok_s_naive": round(rate(naive, "precompute"), 1),
                "precompute_throughput_ratio_ours_over_naive": round(
                    rate(ours, "precompute") / rate(naive, "precompute"), 3
                ),
                "padding_waste": {side: round(r["padding_waste"], 4) for side, r in sides.items()},
                "max_abs_logp_diff_ours_vs_naive": logp_diff,
                "train_memory_ratio_ours_over_trl": round(
                    (ours["peak_rss_mb"] - ours["rss_before_train_mb"])
                    / max(1.0, trl["peak_rss_mb"] - trl["rss_before_train_mb"]),
                    3,
                ),
            },
            indent=1,
        )
    )


def dpo_bench_parser(description: str, pairs: int) -> argparse.ArgumentParser:
    """The model, data and training arguments the DPO benches share."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data-dir", default=str(alignflow_home() / "genies"))
    p.add_argument("--distribution", default="alpaca_low_quality")
    p.add_argument("--pairs", type=int, default=pairs)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    return p


def main() -> None:
    p = dpo_bench_parser(__doc__.splitlines()[0], pairs=64)
    p.add_argument("--token-budget", type=int, default=4096)
    p.add_argument("--side", choices=["alignflow", "trl", "naive"], help="run one side only (the driver runs both)")
    args, argv = p.parse_known_args()
    if args.side:
        run_side(args)
    else:
        compare(args, sys.argv[1:])


if __name__ == "__main__":
    main()
