"""EleutherAI's lm-evaluation-harness on Mini Llama checkpoints: a model adapter, registered as `minillama`.

Requests are tokenized exactly as the harness's Hugging Face model tokenizes them for Mini Llama's exported
tokenizer (BOS first unless the text starts with "<s>"; a context's trailing spaces moved to the continuation; the
whole string encoded and split after the context's tokens), so that its numbers are the `--model hf` numbers of
`minillama export hf`. Scoring runs Mini Llama's forward in length-sorted batches with the output head only at
the scored positions; generation is Mini Llama's KV-cached sampling. Under torchrun each rank evaluates its share
of every task (the harness's own data parallelism) and rank 0 gathers the results.

Importing this module needs `lm_eval` (pip install 'minillama[harness]').
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from minillama.checkpoint import load_for_inference
from minillama.device import pick_device
from minillama.distributed import close_distributed, init_distributed
from minillama.errors import ArgumentError, MiniLlamaError
from minillama.files import claim_remade_output
from minillama.generate import document_end_ids
from minillama.inference.cache import right_padded
from minillama.inference.engine import Engine, Request
from minillama.inference.sampling import SamplingParams
from minillama.inference.scoring import score_targets

BOS_TEXT = "<s>"  # how the harness recognises a text that already starts with BOS


@register_model("minillama")
class MiniLlamaLM(TemplateLM):
    """`lm_eval --model minillama --model_args checkpoint=PATH[,device=cuda,dtype=bfloat16,batch_size=32]`."""

    def __init__(self, checkpoint: str, device: str | None = "auto", dtype: str = "auto", batch_size: int | str | None = 16,
                 max_gen_toks: int = 256, tokenizer: str | None = None, **_: Any):
        super().__init__()
        self.model, self.tok, self.info = load_for_inference(checkpoint, device or "auto", dtype, tokenizer)
        self.batch_size = 16 if batch_size in (None, "auto") else int(batch_size)  # "auto": a fixed, safe size
        if self.batch_size < 1:
            raise MiniLlamaError(f"the batch size is {self.batch_size}; expected a positive integer")
        self.max_gen_toks = int(max_gen_toks)
        self._device = self.model.tok_embeddings.weight.device
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self._rank = torch.distributed.get_rank() if distributed else 0
        self._world_size = torch.distributed.get_world_size() if distributed else 1

    # --- what the harness asks of a model ---------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    @property
    def max_length(self) -> int:
        return self.model.config.max_seq_len

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def tokenizer_name(self) -> str:
        return f"minillama-{self.tok.fingerprint[:16]}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_: Any) -> list[int]:
        bos = not string.startswith(BOS_TEXT) if add_special_tokens is None else add_special_tokens
        return self.tok.encode(string, bos=bos)

    def tok_decode(self, tokens: Sequence[int], **_: Any) -> str:
        return self.tok.decode(tokens)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, tensor)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        if self.world_size == 1:
            return [obj]
        gathered = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj, gathered, dst=dst)
        return gathered

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    # --- scoring ---------------------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **_: Any) -> list[tuple[float, bool]]:
        """(sum of log-probabilities, whether greedy decoding picks every token) of each continuation after its
        context, the sequence cut from the left to max_length + 1 tokens as the harness's HF model does.

        Requests whose inputs are the same tokens and whose continuations have the same length (a context's
        one-token answers, or a repeated request) differ only in what is scored: one forward pass serves them all.
        """
        groups: dict[tuple[tuple[int, ...], int], list[int]] = {}
        for i, (_, context, continuation) in enumerate(requests):
            whole = (context + continuation)[-(self.max_length + 1):]
            groups.setdefault((tuple(whole[:-1]), len(continuation)), []).append(i)
        keys = sorted(groups, key=lambda key: -len(key[0]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        with torch.no_grad():
            for first in tqdm(range(0, len(keys), self.batch_size), disable=disable_tqdm or self.rank != 0,
                              desc="minillama loglikelihood"):
                batch = keys[first : first + self.batch_size]
                members = [[requests[i][2] for i in groups[key]] for key in batch]
                for key, scored in zip(batch, self._score([list(k[0]) for k in batch], [k[1] for k in batch], members)):
                    for i, answer in zip(groups[key], scored):
                        results[i] = answer
                        if requests[i][0] is not None:
                            self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return results

    def _score(self, inputs: list[list[int]], scored: list[int], members: list[list[list[int]]]) -> list[list[tuple[float, bool]]]:
        """For each input sequence, its last `scored[i]` positions predict the tokens of each continuation in
        `members[i]`; the output head runs at those positions only."""
        device = self.device
        rows, columns, offsets = [], [], [0]
        for row, (sequence, n) in enumerate(zip(inputs, scored)):
            rows += [row] * n
            columns += range(len(sequence) - n, len(sequence))
            offsets.append(offsets[-1] + n)
        states = self.model.hidden_states(right_padded(inputs, max(map(len, inputs))).to(device))
        states = states[torch.tensor(rows, device=device), torch.tensor(columns, device=device)]
        state_of, targets, owners = [], [], []  # for each scored token: its state's index, the token, its answer
        continuations = [(group, continuation) for group, group_members in enumerate(members) for continuation in group_members]
        for answer, (group, continuation) in enumerate(continuations):
            state_of += range(offsets[group], offsets[group] + len(continuation))
            targets += continuation
            owners += [answer] * len(continuation)
        scores = score_targets(self.model, states[torch.tensor(state_of, device=device)], torch.tensor(targets, device=device))
        owners_t = torch.tensor(owners, dtype=torch.long, device=device)
        answers = len(continuations)
        summed = torch.zeros(answers, dtype=torch.float64, device=device).index_add_(0, owners_t, scores.log_probs.double())
        misses = torch.zeros(answers, dtype=torch.long, device=device).index_add_(0, owners_t, (~scores.greedy).long())
        flat = [(float(s), bool(m == 0)) for s, m in zip(summed.tolist(), misses.tolist())]
        out, taken = [], 0
        for continuations in members:
            out.append(flat[taken : taken + len(continuations)])
            taken += len(continuations)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in disjoint windows of max_length tokens (each conditioned on the
        tokens before it in its window), summed per text."""
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for index, (log_prob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[index] += log_prob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # --- generation ------------------------------------------------------------------------------------------

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continuations cut at the first stop sequence, ended where a document ends (BOS or EOS, as `minillama
        generate` and the exported generation config stop), greedy unless the task asks to sample. They run on
        one engine, `batch_size` at a time, each stopping as soon as its text holds a stop sequence; the text is
        then decoded as the harness's HF model decodes it (the new tokens alone) and cut at the first stop."""
        eos = self.tok.decode([self.eot_token_id]) or None
        engine = Engine(self.model, self.tok, rows=self.batch_size)
        jobs = []
        for request in requests:
            kwargs = normalize_gen_kwargs(dict(request.args[1]), self.max_gen_toks)
            until = tuple(stop for stop in handle_stop_sequences(kwargs.pop("until", None), eos=eos) if stop)
            max_gen_toks = min(kwargs.pop("max_gen_toks"), self.max_length - 1)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            context = self.tok_encode(request.args[0])[-(self.max_length - max_gen_toks):]
            [completion] = engine.submit(Request(context, max_gen_toks, SamplingParams(temperature), stop=until,
                                                 stop_ids=frozenset(document_end_ids(self.tok))))
            jobs.append((completion, until))
        with tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="minillama generate_until") as progress:
            for update in engine.run():
                progress.update(update.finish_reason is not None)
        results = []
        for request, (completion, until) in zip(requests, jobs):
            text = self.tok_decode(completion.tokens)
            for stop in until:
                text = text.split(stop)[0]
            results.append(text)
            self.cache_hook.add_partial("generate_until", request.args, text)
        return results


def _earlier_results(output: Path, checkpoint: Path, settings: dict[str, Any], force: bool) -> dict[str, Any]:
    """The results an earlier run wrote to `output` that this run keeps: all of them when made for the same checkpoint
    with the same settings, none with `force`; anything else is refused."""
    if force or not output.is_file():
        return {}
    earlier = json.loads(output.read_text(encoding="utf-8"))
    config = earlier.get("config") if isinstance(earlier.get("config"), dict) else {}
    before = {"checkpoint": str(Path(str(earlier.get("checkpoint"))).resolve()), **{key: config.get(key) for key in settings}}
    now = {"checkpoint": str(Path(checkpoint).resolve()), **settings}
    if before != now:
        differ = ", ".join(f"{key} {before[key]} (now {now[key]})" for key in now if before[key] != now[key])
        tasks = ", ".join(sorted(earlier.get("results") or {})) or "no task"
        raise ArgumentError("{path} holds results of {tasks} made with {differ}; pass {force} to replace them, or write to "
                            "another {output}", path=output, tasks=tasks, differ=differ)
    return earlier


def is_harness_results(path: Path) -> bool:
    """A results file `run_harness` wrote: a JSON object naming the checkpoint, its results and the settings."""
    try:
        summary = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(summary, dict) and {"checkpoint", "results", "config"} <= summary.keys()


def task_manager(include_path: Path | None = None, tasks: Sequence[str] = ()) -> Any:
    """The harness's index of tasks: of `include_path` alone when every one of `tasks` is a plain task there
    (indexing the thousands of task files the harness ships takes seconds, in every process of a torchrun), else
    of the harness's own tasks and those under `include_path`. Built once per process for each state of that
    folder's YAML files, so repeated `run_harness` calls in one session pay for it once."""
    if include_path is None:
        return _indexed_tasks(None, (), True)
    folder = Path(include_path)
    files = sorted(folder.rglob("*.yaml")) if folder.is_dir() else [folder]
    state = tuple((str(f), f.stat().st_mtime_ns) for f in files if f.exists())
    own = _indexed_tasks(str(folder), state, False)
    if tasks and all(task in own.all_subtasks for task in tasks):
        return own
    return _indexed_tasks(str(folder), state, True)


@lru_cache(maxsize=4)
def _indexed_tasks(include_path: str | None, yaml_files: tuple[tuple[str, int], ...], with_harness_tasks: bool) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=with_harness_tasks)


def run_harness(checkpoint: Path, tasks: list[str], limit: int | float | None = None, batch_size: int = 16,
                device: str = "auto", dtype: str = "auto", tokenizer: Path | None = None, include_path: Path | None = None,
                num_fewshot: int | None = None, output: Path | None = None, log_samples: bool = False,
                force: bool = False) -> dict[str, Any] | None:
    """Evaluate `tasks` on a checkpoint; the harness's results dict on rank 0 (None on other ranks), also written
    to `output` as JSON when given. Under torchrun the ranks join one process group for the harness to split on.
    `log_samples` also writes each document's requests, responses and metrics, in the harness's own
    samples_TASK_DATE.jsonl files (as `lm_eval --log_samples` does), beside `output`. An earlier results file there
    made with the same settings keeps its other tasks' results (a task run again is replaced); one made with other
    settings is refused unless `force`, as a --limit run would otherwise pass itself off as the full one's."""
    from lm_eval import simple_evaluate

    if limit is not None and not limit > 0:  # NaN too
        raise MiniLlamaError(f"the example limit is {limit}; expected a positive number (or no limit)")
    if not tasks:
        raise ArgumentError("no task names were given; pass {tasks}, e.g. hellaswag,arc_easy")
    if log_samples and output is None:
        raise ArgumentError("per-sample logs go beside the results file: give an {output} path for them")
    if num_fewshot is not None and num_fewshot < 0:
        raise ArgumentError("{num_fewshot} is {value}; expected 0 or more examples before each question", value=num_fewshot)
    if include_path is not None and not Path(include_path).exists():
        raise ArgumentError("{include_path} {path} does not exist; pass a folder (or a file) of task YAMLs", path=include_path)
    settings = {"limit": limit, "num_fewshot": num_fewshot}
    earlier: dict[str, Any] = {}
    if output is not None:
        claim_remade_output(Path(output), "harness results file", is_harness_results)
        earlier = _earlier_results(Path(output), checkpoint, settings, force)
    manager = task_manager(include_path, tasks)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ArgumentError("unknown harness task {task!r}; list them with `lm_eval ls tasks`, or pass {include_path} (a "
                            "folder holding its YAML)", task=unknown[0])
    ctx = init_distributed(device)  # under torchrun: each rank takes its share of every task
    try:
        model = MiniLlamaLM(str(checkpoint), device=str(pick_device(device, ctx.local_rank)), dtype=dtype,
                            batch_size=batch_size, tokenizer=str(tokenizer) if tokenizer else None)
        try:
            results = simple_evaluate(model=model, tasks=tasks, limit=limit, num_fewshot=num_fewshot, task_manager=manager,
                                      log_samples=log_samples)
        except ConnectionError as exc:  # a task's dataset is on the hub, and the hub is out of reach
            raise ArgumentError("cannot download the data of {names} ({why}); offline, pass {include_path} (a folder holding "
                                "task YAMLs over local files, e.g. the repository's examples/tasks: hellaswag_local)",
                                names=", ".join(tasks), why=f"{type(exc).__name__}: {str(exc)[:160]}") from None
    finally:
        close_distributed(ctx)
    if results is not None and output is not None:
        from minillama.files import write_file_atomically

        if log_samples:
            from lm_eval.loggers import EvaluationTracker

            tracker = EvaluationTracker(output_path=str(output))  # a path ending in .json: samples go to its folder
            tracker.date_id = datetime.now().isoformat().replace(":", "-")  # as its save_results_aggregated names files
            samples = results.pop("samples")
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            for task in results["configs"]:
                tracker.save_results_samples(task_name=task, samples=samples[task])
        summary = {"checkpoint": str(model.info.path), "step": model.info.metadata.get("step"),
                   "results": {**earlier.get("results", {}), **results["results"]},
                   "versions": {**(earlier.get("versions") or {}), **(results.get("versions") or {})},
                   "n-samples": {**(earlier.get("n-samples") or {}), **(results.get("n-samples") or {})},
                   "config": {**settings, "batch_size": batch_size}}
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        write_file_atomically(Path(output), json.dumps(summary, indent=2, default=str).encode())
    return results
