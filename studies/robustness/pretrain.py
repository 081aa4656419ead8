"""Pre-train the study's small LLaMA on the generated corpus, so fine-tuning starts from a model that knows something.

The architecture is a LLaMA built from config (no hub weights); the tokenizer is a BPE trained on
the corpus and the task. Training is plain causal language modelling with TRL's SFTTrainer on
packed documents. At the end the script measures how many arithmetic facts of the corpus the model
completes correctly ("a + b =" -> " c.") and saves that beside the weights, as the evidence that
the base model learned something before any fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import shutil
from pathlib import Path

import torch
from datasets import load_dataset
from transformers import LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase, set_seed
from trl import SFTConfig, SFTTrainer

from monte_ds.atomic import atomic_directory, atomic_write_json
from monte_ds.tiny import build_tokenizer, tiny_llama_config


logger = logging.getLogger("pretrain")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@torch.no_grad()
def fact_recall(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, facts: list[str]) -> float:
    """Fraction of facts `a op b = c.` whose greedy completion of `a op b =` is ` c.`."""
    model.eval()
    tokenizer.padding_side = "left"
    prompts = [fact[: fact.index("=") + 1] for fact in facts]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    generated = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    completions = tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    answers = [fact[fact.index("=") + 1 :].strip(" .") for fact in facts]
    correct = sum(
        re.match(rf"\s*{answer}\b", completion) is not None for answer, completion in zip(answers, completions)
    )
    return correct / len(facts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the folder make_data.py wrote")
    parser.add_argument("--out", type=Path, required=True, help="where the base model and tokenizer go")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    set_seed(args.seed)

    documents = [row["text"] for row in read_jsonl(args.data / "pretrain.jsonl")]
    problems = read_jsonl(args.data / "gsm8k" / "train.jsonl")
    # The tokenizer covers the task's words too, as a real base model's tokenizer would.
    tokenizer = build_tokenizer(
        documents + [f"Question: {p['question']}\nAnswer: {p['answer']}" for p in problems], vocab_size=args.vocab_size
    )
    config = tiny_llama_config(
        len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 32,
        num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=1024,
    )
    model = LlamaForCausalLM(config)
    logger.info("base model: %.2fM parameters, vocabulary %d", model.num_parameters() / 1e6, len(tokenizer))

    with atomic_directory(args.out) as out:
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(
                output_dir=str(out / "trainer"),
                max_steps=args.steps,
                per_device_train_batch_size=args.batch_size,
                learning_rate=args.learning_rate,
                lr_scheduler_type="cosine",
                warmup_steps=args.steps // 20,
                weight_decay=0.01,
                packing=True,
                packing_strategy="wrapped",  # plain concatenation: no cross-document masking needed
                max_length=args.seq_len,
                logging_steps=50,
                save_strategy="no",
                report_to=[],
                seed=args.seed,
                use_cpu=True,
                dataloader_num_workers=0,
                gradient_checkpointing=False,  # TRL turns it on by default; a 1M-parameter model needs no memory saving
                bf16=False,  # TRL's default autocasts to bf16, which a CPU without native bf16 emulates ~8x slower
            ),
            train_dataset=load_dataset("json", data_files=str(args.data / "pretrain.jsonl"), split="train"),
            processing_class=tokenizer,
        )
        result = trainer.train()
        rng = random.Random(args.seed)
        facts = [
            line
            for doc in rng.sample(documents, 200)
            for line in doc.splitlines()
            if re.fullmatch(r"[\d +*=.-]+", line)
        ]
        recall = fact_recall(model, tokenizer, facts)
        logger.info(
            "final train loss %.3f; arithmetic fact recall %.1f%% of %d", result.training_loss, 100 * recall, len(facts)
        )
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        atomic_write_json(
            out / "pretrain_report.json",
            {
                "train_loss": result.training_loss,
                "arithmetic_fact_recall": recall,
                "n_facts": len(facts),
                "parameters": model.num_parameters(),
                **vars(args) | {"data": str(args.data), "out": str(args.out)},
            },
        )
        shutil.rmtree(out / "trainer", ignore_errors=True)


if __name__ == "__main__":
    main()
