"""lm-evaluation-harness on Mini Llama checkpoints: the adapter against the harness's own Hugging Face model on
`minillama export hf`'s output, over local task definitions (the hub is not reachable from the tests)."""

import json
import random
import shutil
from pathlib import Path

import pytest
from conftest import data_file

from minillama.cli import main
from minillama.interop.hf import export_hf

lm_eval = pytest.importorskip("lm_eval", reason="needs the 'harness' extra (lm-eval)")
pytest.importorskip("accelerate", reason="the harness's HF model, the reference here, needs accelerate")

from lm_eval import simple_evaluate  # noqa: E402

from minillama.eval import harness  # noqa: E402
from minillama.eval.harness import MiniLlamaLM  # noqa: E402

EXAMPLE_TASKS = Path(__file__).resolve().parents[1] / "examples" / "tasks"
TASKS = ["hellaswag_local", "shakespeare_next_line", "shakespeare_rolling", "shakespeare_continue"]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, test_data):
    """Local tasks: examples/tasks/hellaswag_local over the 10 real validation rows, a multiple-choice and a
    perplexity task from tiny shakespeare, and a generation task with a stop sequence."""
    folder = tmp_path_factory.mktemp("tasks")
    for name in ("hellaswag_local.yaml", "hellaswag_local.py"):  # the local HellaSwag task the README ships
        shutil.copy(EXAMPLE_TASKS / name, folder / name)
    lines = [line for line in data_file(test_data, "tinyshakespeare.txt").read_text().splitlines() if len(line) > 20]
    rng = random.Random(0)
    docs = []
    for i in range(0, 1200, 100):
        choices = [lines[i + 1]] + rng.sample(lines, 3)
        order = rng.sample(range(4), 4)
        docs.append({"context": lines[i], "choices": [choices[j] for j in order], "gold": order.index(0), "next": lines[i + 1]})
    with open(folder / "next_line.jsonl", "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    text = data_file(test_data, "tinyshakespeare.txt").read_text()
    with open(folder / "passages.jsonl", "w") as f:
        f.writelines(json.dumps({"text": text[i : i + 1500]}) + "\n" for i in range(0, 6000, 1500))
    local = "dataset_path: json\ndataset_name: null\ntest_split: test\ndataset_kwargs:\n  data_files:\n    test: {}\n"
    (folder / "next_line.yaml").write_text(
        "task: shakespeare_next_line\noutput_type: multiple_choice\n" + local.format(folder / "next_line.jsonl")
        + 'doc_to_text: "{{context}}\\n"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (folder / "rolling.yaml").write_text(
        "task: shakespeare_rolling\noutput_type: loglikelihood_rolling\n" + local.format(folder / "passages.jsonl")
        + 'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    with open(folder / "short_passages.jsonl", "w") as f:  # rolling texts that fit one window, for the server
        f.writelines(json.dumps({"text": f"ROMEO: line {i}. " + "O speak again, bright angel! " * (i + 1)}) + "\n" for i in range(5))
    (folder / "short_rolling.yaml").write_text(
        "task: shakespeare_short_rolling\noutput_type: loglikelihood_rolling\n" + local.format(folder / "short_passages.jsonl")
        + 'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n')
    (folder / "continue.yaml").write_text(
        "task: shakespeare_continue\noutput_type: generate_until\n" + local.format(folder / "next_line.jsonl")
        + 'doc_to_text: "{{context}}\\n"\ndoc_to_target: "{{next}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 24\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n")
    stock = Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "hellaswag.yaml"  # the hub task, its data from disk
    (folder / "hellaswag_stock.yaml").write_text(
        f"include: {stock}\ntask: hellaswag_stock\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {data_file(test_data, 'hellaswag_val_head10.jsonl')}\n"
        "training_split: null\n")
    with pytest.MonkeyPatch.context() as environment:
        environment.setenv("MINILLAMA_HELLASWAG", str(data_file(test_data, "hellaswag_val_head10.jsonl")))
        yield folder


@pytest.fixture(scope="module")
def task_manager(task_dir):
    """The index of the local tasks, the one `eval harness --include-path` uses when it holds every task asked for."""
    return harness.task_manager(task_dir, TASKS + ["hellaswag_stock", "shakespeare_short_rolling"])


def evaluate_both(checkpoint, manager, tmp_path, limit=None):
    export_hf(checkpoint, tmp_path / "hf")
    ours = simple_evaluate(model=MiniLlamaLM(str(checkpoint), device="cpu", batch_size=8), tasks=TASKS, task_manager=manager,
                           log_samples=True, limit=limit)
    theirs = simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'hf'},dtype=float32", device="cpu", batch_size=8,
                             tasks=TASKS, task_manager=manager, log_samples=True, limit=limit)
    return ours, theirs


def test_the_task_index_is_built_once_per_state_of_the_include_folder_and_of_it_alone_when_it_holds_the_tasks(tmp_path,
                                                                                                           monkeypatch):
    built = []

    class Index:  # lm-eval's TaskManager as far as the choice goes: the folder's task "a", or the harness's too
        def __init__(self, include_path=None, include_defaults=True):
            built.append((include_path, include_defaults))
            self.all_subtasks = ["a", "arc_easy"] if include_defaults else ["a"]

    monkeypatch.setattr("lm_eval.tasks.TaskManager", Index)
    (tmp_path / "a.yaml").write_text("task: a\n")
    own = harness.task_manager(tmp_path, ["a"])
    assert harness.task_manager(tmp_path, ["a"]) is own and built == [(str(tmp_path), False)]
    assert harness.task_manager(tmp_path, ["a", "arc_easy"]).all_subtasks == ["a", "arc_easy"]
    assert built == [(str(tmp_path), False), (str(tmp_path), True)]
    (tmp_path / "b.yaml").write_text("task: b\n")  # a task added between two evaluations in one session
    assert harness.task_manager(tmp_path, ["a"]) is not own and built[-1] == (str(tmp_path), False) and len(built) == 3


@pytest.mark.slow
def test_the_shipped_local_hellaswag_task_asks_what_the_hub_task_asks(stories, task_dir, task_manager, tmp_path, monkeypatch, capsys):
    tasks = task_manager.load_task_or_group(["hellaswag_local", "hellaswag_stock"])
    local, stock = (tasks[name] for name in ("hellaswag_local", "hellaswag_stock"))
    asked = [[(task.doc_to_text(doc), task.doc_to_choice(doc), task.doc_to_target(doc)) for doc in task.validation_docs()]
             for task in (local, stock)]
    assert asked[0] == asked[1] and len(asked[0]) == 10
    monkeypatch.setenv("MINILLAMA_HELLASWAG", str(tmp_path / "missing.jsonl"))
    assert main(["eval", "harness", str(stories), "--tasks", "hellaswag_local", "--include-path", str(task_dir)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"minillama: error: hellaswag_local: {tmp_path / 'missing.jsonl'} does not exist; set MINILLAMA_HELLASWAG=FILE.jsonl "
        "(rowanz/hellaswag's hellaswag_val.jsonl), or run `minillama eval hellaswag` once where the internet is reachable")


@pytest.mark.slow
@pytest.mark.parametrize("which", ["stories", "tiny"])
def test_adapter_gives_the_harness_hf_numbers(which, request, task_manager, tmp_path):
    checkpoint = request.getfixturevalue(which)
    ours, theirs = evaluate_both(checkpoint, task_manager, tmp_path, limit=None if which == "stories" else 6)
    for task in ["hellaswag_local", "shakespeare_next_line"]:
        for metric in ["acc,none", "acc_norm,none"]:
            assert ours["results"][task][metric] == theirs["results"][task][metric], (task, metric)
        # Per request: the same (context, continuation) tokens, the same log-likelihood and greedy flag.
        for a, b in zip(ours["samples"][task], theirs["samples"][task]):
            for (ll_a, greedy_a), (ll_b, greedy_b) in zip((r[0] for r in a["resps"]), (r[0] for r in b["resps"])):
                assert abs(ll_a - ll_b) < 1e-4 * max(1.0, abs(ll_b) / 10) and greedy_a == greedy_b
    rolling = "shakespeare_rolling"
    for a, b in zip(ours["samples"][rolling], theirs["samples"][rolling]):
        assert abs(a["resps"][0][0] - b["resps"][0][0]) < 1e-4 * max(1.0, abs(b["resps"][0][0]) / 10)
    assert ours["results"][rolling]["bits_per_byte,none"] == pytest.approx(theirs["results"][rolling]["bits_per_byte,none"], rel=1e-6)
    generated = [s["resps"][0][0] for s in ours["samples"]["shakespeare_continue"]]
    assert generated == [s["resps"][0][0] for s in theirs["samples"]["shakespeare_continue"]]
    assert all("\n" not in text for text in generated) and any(text for text in generated)


@pytest.mark.slow
def test_cli_runs_tasks_writes_results_into_the_run_and_report_shows_them(tiny, task_dir, capsys):
    run_dir = tiny.parent.parent
    assert main(["eval", "harness", str(run_dir), "--tasks", "hellaswag_local,shakespeare_rolling", "--limit", "4",
                 "--include-path", str(task_dir), "--device", "cpu", "--batch-size", "4", "--log-samples"]) == 0
    out = capsys.readouterr().out
    assert "hellaswag_local" in out and "acc_norm" in out and "bits_per_byte" in out
    saved = json.loads((run_dir / "harness" / "step_0000040.json").read_text())
    assert saved["results"]["hellaswag_local"]["sample_len"] == 4 and saved["config"]["limit"] == 4
    for task, metric in (("hellaswag_local", "acc_norm"), ("shakespeare_rolling", "bits_per_byte")):
        [log] = (run_dir / "harness").glob(f"samples_{task}_*.jsonl")  # the harness's own per-sample file
        samples = [json.loads(line) for line in log.read_text().splitlines()]
        assert [s["doc_id"] for s in samples] == [0, 1, 2, 3] and all(metric in s and s["resps"] for s in samples)
    hellaswag = [json.loads(line) for line in next((run_dir / "harness").glob("samples_hellaswag_local_*")).read_text().splitlines()]
    assert sum(s["acc_norm"] for s in hellaswag) / 4 == saved["results"]["hellaswag_local"]["acc_norm,none"]
    assert main(["report", str(run_dir)]) == 0
    report = (run_dir / "report.md").read_text()
    assert "## lm-evaluation-harness, step_0000040" in report and "| hellaswag_local | acc_norm |" in report
    assert "Mini Llama's own HellaSwag above" not in report  # this run evaluated none of its own


@pytest.mark.slow
def test_cli_refuses_unknown_tasks_bad_limits_and_hub_tasks_offline_in_one_line(stories, task_dir, capsys, monkeypatch):
    assert main(["eval", "harness", str(stories), "--tasks", "hellaswag_locale"]) == 2  # checked against the harness's tasks
    assert capsys.readouterr().err.startswith("minillama: error: unknown harness task 'hellaswag_locale'; list them with")
    assert main(["eval", "harness", str(stories), "--tasks", "hellaswag_local", "--limit", "0", "--include-path", str(task_dir)]) == 2
    assert capsys.readouterr().err == "minillama: error: the example limit is 0.0; expected a positive number (or no limit)\n"

    def offline(*args, **kwargs):  # what datasets raises where the hub cannot be reached
        raise ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr("datasets.load_dataset", offline)
    assert main(["eval", "harness", str(stories), "--tasks", "hellaswag"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1].startswith("minillama: error: cannot download the data of hellaswag ("), err
    assert "offline, pass --include-path (a folder holding task YAMLs over local files, e.g. the repository's examples/tasks" in err


@pytest.mark.slow
def test_registered_name_and_two_ranks_give_the_single_process_numbers(stories, task_dir, task_manager, tmp_path):
    import subprocess
    import sys

    single = simple_evaluate(model="minillama", model_args=f"checkpoint={stories},device=cpu", tasks=["hellaswag_local"],
                             task_manager=task_manager)["results"]["hellaswag_local"]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "minillama",
                             "eval", "harness", str(stories), "--tasks", "hellaswag_local", "--include-path", str(task_dir),
                             "--device", "cpu", "--output", str(tmp_path / "two.json")],
                            capture_output=True, text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    two = json.loads((tmp_path / "two.json").read_text())["results"]["hellaswag_local"]
    assert (two["acc,none"], two["acc_norm,none"], two["sample_len"]) == (single["acc,none"], single["acc_norm,none"], 10)
    assert result.stdout.count("hellaswag_local") == 1  # rank 0 alone prints the table


@pytest.mark.slow
def test_lm_evals_own_api_client_scores_through_the_server_as_the_adapter_does_in_process(stories, task_manager, tmp_path):
    """`lm_eval --model local-completions` (token-id prompts, echo, logprobs, max_tokens 1 for log-likelihoods;
    generation with stop sequences) against `minillama serve`, on a multiple-choice, a rolling-perplexity and a
    generation task, gives the in-process adapter's numbers. The rolling texts fit in one window, since the
    server needs one position more than in-process scoring for each window (the token it generates)."""
    pytest.importorskip("aiohttp", reason="needs lm-eval's 'api' extra")
    from conftest import serving

    from minillama.checkpoint import load_for_inference
    from minillama.serve.app import create_app

    tasks = ["hellaswag_local", "shakespeare_short_rolling", "shakespeare_continue"]
    ours = simple_evaluate(model=MiniLlamaLM(str(stories), device="cpu", batch_size=8), tasks=tasks, task_manager=task_manager,
                           log_samples=True, limit=6)
    export_hf(stories, tmp_path / "hf")
    model, tokenizer, _ = load_for_inference(stories, "cpu", "float32")
    with serving(create_app(model, tokenizer, "stories260K")) as url:
        theirs = simple_evaluate(model="local-completions", tasks=tasks, task_manager=task_manager, log_samples=True, limit=6,
                                 model_args=f"base_url={url}/v1/completions,model=stories260K,tokenizer_backend=huggingface,"
                                            f"tokenizer={tmp_path / 'hf'},add_bos_token=True,max_length=512,batch_size=4")
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["hellaswag_local"][metric] == theirs["results"]["hellaswag_local"][metric]
    for a, b in zip(ours["samples"]["hellaswag_local"], theirs["samples"]["hellaswag_local"]):
        for (ll_a, greedy_a), (ll_b, greedy_b) in zip((r[0] for r in a["resps"]), (r[0] for r in b["resps"])):
            assert abs(ll_a - ll_b) < 1e-4 * max(1.0, abs(ll_b) / 10) and greedy_a == greedy_b
    rolling = "shakespeare_short_rolling"
    assert theirs["results"][rolling]["bits_per_byte,none"] == pytest.approx(ours["results"][rolling]["bits_per_byte,none"], rel=1e-5)
    # The server's text continues the prompt (a leading space included, as OpenAI's and vLLM's do); the HF-style
    # adapter decodes the new tokens alone, which drops it. Otherwise the generations are the same.
    generated = [[s["resps"][0][0] for s in run["samples"]["shakespeare_continue"]] for run in (ours, theirs)]
    assert [g.lstrip() for g in generated[0]] == [g.lstrip() for g in generated[1]] and any(generated[0])
    assert ours["results"]["shakespeare_continue"]["exact_match,none"] == theirs["results"]["shakespeare_continue"]["exact_match,none"]


def test_a_second_run_to_the_same_results_file_merges_same_settings_and_refuses_others(stories, task_dir, tmp_path):
    """Another task with the same settings joins the file; the same task with another --limit would pass itself off
    as the earlier run's, so it is refused (file untouched) unless forced, which then replaces the file."""
    from minillama.errors import ArgumentError

    out = tmp_path / "results.json"

    def run(tasks, limit, force=False):
        return harness.run_harness(stories, tasks, limit=limit, device="cpu", include_path=task_dir, output=out, force=force)

    first = run(["hellaswag_local"], 4)["results"]["hellaswag_local"]
    run(["shakespeare_continue"], 4)
    merged = json.loads(out.read_text())
    assert sorted(merged["results"]) == ["hellaswag_local", "shakespeare_continue"]
    assert merged["results"]["hellaswag_local"]["acc,none"] == first["acc,none"]
    before = out.read_bytes()
    with pytest.raises(ArgumentError, match=r"holds results of hellaswag_local, shakespeare_continue made with limit 4 \(now 2\); "
                                            r"pass force to replace them"):
        run(["hellaswag_local"], 2)
    assert out.read_bytes() == before
    run(["hellaswag_local"], 2, force=True)
    replaced = json.loads(out.read_text())
    assert sorted(replaced["results"]) == ["hellaswag_local"] and replaced["config"]["limit"] == 2
