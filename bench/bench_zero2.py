"""DPO training throughput: one process versus DeepSpeed ZeRO-2 on 2 ranks (Ray
actors on this machine, gloo), on the same model, pairs, reference log-probs,
LoRA, precision (float32) and global batch (batch_size x grad_accum pairs per
optimizer step).

Tokens/s cover the training loop only (tasks/training.py ``train``, from the
engine built to the last step): loading the model, Ray and DeepSpeed start-up
are left out, and are reported as the ZeRO-2 side's wall time. Tokens are prompt
+ response tokens of both sides of every pair, per epoch. Both sides get the
same cores: one process runs torch's threads on all of them, the ranks split
them (Ray starts each with OMP_NUM_THREADS from its CPU share, 1 here). One
process on one thread is the control: ZeRO-2 over it is the scaling of two
ranks over one rank's share of the machine (ideal: 2).

    python bench/bench_zero2.py --data-dir $ALIGNFLOW_HOME/genies --pairs 32
"""

from __future__ import annotations

import json
import tempfile
import time
from functools import partial

from bench_dpo_trl import dpo_bench_parser, load_pairs

from alignflow.config import DPOConfig, LogprobsConfig, alignflow_home

LORA = {"r": 16, "alpha": 32}


def timed_training(model_dir, rows: list[dict], config: DPOConfig) -> dict:
    """Train on this process (the only one, or a rank); seconds of the loop and its per-step losses."""
    import torch

    from alignflow.storage.artifacts import ArtifactStore
    from alignflow.tasks.train_dpo import dpo_objective
    from alignflow.tasks.training import Checkpoints, make_engine, prepare_model, train

    model, tokenizer = prepare_model(model_dir, config)
    engine = make_engine(model, config)
    started = time.perf_counter()
    state = train(
        model,
        rows,
        [],
        config,
        dpo_objective(config, tokenizer.pad_token_id),
        Checkpoints(ArtifactStore(tempfile.mkdtemp(prefix="bench-zero2-")), "train_dpo", "bench"),
        engine=engine,
    )
    return {
        "train_s": time.perf_counter() - started,
        "losses": [r["loss"] for r in state.log],
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    p = dpo_bench_parser(__doc__.splitlines()[0], pairs=32)
    p.add_argument("--grad-accum", type=int, default=2)
    args = p.parse_args()

    import ray
    import torch

    from alignflow.tasks.logprobs import reference_logprobs
    from alignflow.workers.distributed import run_distributed
    from alignflow.workers.hf import HFBackend
    from alignflow.workers.models import resolve_model_dir

    model_dir = resolve_model_dir(args.model, alignflow_home() / "models")
    pairs = [{**p, "prompt_id": p["id"]} for p in load_pairs(args)]
    rows, _ = reference_logprobs(HFBackend(model_dir, "float32"), pairs, LogprobsConfig())
    tokens = args.epochs * sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
    config = DPOConfig(
        lr=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        val_fraction=0.0,
        checkpoint_every=10**6,
        eval_every=10**6,
        lora=LORA,
    )

    sides = {"one_process": timed_training(model_dir, rows, config)}
    torch.set_num_threads(1)
    sides["one_process_1_thread"] = timed_training(model_dir, rows, config)
    ray.init(include_dashboard=False, log_to_driver=False)
    zero2_config = config.model_copy(
        update={"distributed": config.distributed.model_copy(update={"strategy": "zero2"})}
    )
    started = time.perf_counter()
    sides["zero2"] = run_distributed(partial(timed_training, model_dir, rows, zero2_config), world_size=2)
    zero2_wall = time.perf_counter() - started

    rate = {side: tokens / r["train_s"] for side, r in sides.items()}
    print(
        json.dumps(
            {
                "model": args.model,
                "pairs": len(rows),
                "tokens_per_epoch": tokens // args.epochs,
                "global_batch": args.batch_size * args.grad_accum,
                "steps": len(sides["zero2"]["losses"]),
                "train_s": {side: round(r["train_s"], 2) for side, r in sides.items()},
                "train_tok_s": {side: round(r, 1) for side, r in rate.items()},
                "zero2_over_one_process": round(rate["zero2"] / rate["one_process"], 3),
                "zero2_over_one_process_1_thread": round(rate["zero2"] / rate["one_process_1_thread"], 3),
                "zero2_wall_s_with_startup": round(zero2_wall, 1),
                "torch_threads": {side: r["torch_threads"] for side, r in sides.items()},
                "max_abs_loss_diff_zero2_vs_one_process": max(
                    abs(a - b) for a, b in zip(sides["one_process"]["losses"], sides["zero2"]["losses"])
                ),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
